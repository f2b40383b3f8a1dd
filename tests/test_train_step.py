"""bench/train_step.py on a tiny random model: the phase table adds up and counts what the step produced."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


@pytest.mark.filterwarnings("ignore")
def test_train_step_table(tmp_path):
    import train_step

    cfg = tmp_path / "config.json"  # 2-layer Llama, vocab larger than the SmolLM2 tokenizer (as for Qwen3)
    cfg.write_text(json.dumps(dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=64,
                                   intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=50000, max_position_embeddings=2048,
                                   tie_word_embeddings=True)))
    out = tmp_path / "table.json"
    table = train_step.main(["--random_init", "--model_config", str(cfg), "--json", str(out), "--peak_tflops", "1",
                             "--max_new_tokens", "8", "--batch_size", "2", "--per_device_train_batch_size", "1",
                             "--lora_r", "4", "--rollout_backend", "hf"])
    assert json.loads(out.read_text())["tokens"] == table["tokens"]
    tk, ph = table["tokens"], table["phases"]
    assert set(ph) == {"rollout", "teacher", "student+backward", "optimizer", "sync"}
    assert tk["prompts"] == 2 and tk["rollouts"] == 2
    assert 2 <= tk["completion"] <= 16  # 1..8 new tokens per rollout
    assert tk["student_pass"] > tk["completion"] and tk["teacher_pass"] > tk["student_pass"]  # teacher sees the solution
    for k in ("rollout", "teacher", "student+backward", "optimizer"):
        assert ph[k]["time_s"] > 0 and ph[k]["peak_bytes"] > 0, k
    assert ph["sync"]["time_s"] >= 0
    assert ph["rollout"]["tokens"] == tk["completion"] and ph["teacher"]["tokens"] == tk["teacher_pass"]
    assert table["step_s"] == pytest.approx(sum(p["time_s"] for p in ph.values()))
    # MFU = the stated FLOPs over time and the given 1 TFLOP/s peak
    P = table["params"]
    assert ph["teacher"]["mfu"] == pytest.approx(2 * P * tk["teacher_pass"] / ph["teacher"]["time_s"] / 1e12)
    assert ph["student+backward"]["mfu"] == pytest.approx(6 * P * tk["student_pass"] / ph["student+backward"]["time_s"] / 1e12)
    assert 0 < table["train_pass_mfu"] < 1 and table["loss"] == table["loss"]  # finite, not NaN
