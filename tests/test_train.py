"""train.py end to end on a tiny random model: bad input, prompt filtering, checkpoints, exact resume ."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT


def run_train(*args, env=None, check=True):
    cmd = [sys.executable, str(ROOT / "train.py"), *map(str, args)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})})
    if check and p.returncode != 0:
        raise AssertionError(f"train.py failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def tiny_args(model, out, **over):
    a = {"model": model, "dataset": "demo-arithmetic", "batch_size": 4, "per_device_train_batch_size": 2,
         "max_new_tokens": 12, "max_prompt_length": 512, "rollout_backend": "hf", "lora_r": 4, "lora_alpha": 8,
         "learning_rate": 1e-2, "max_grad_norm": 1.0, "save_steps": 2, "output_dir": out, "seed": 1}
    a.update(over)
    return [x for k, v in a.items() for x in (f"--{k}", v)]


def losses(out):
    return [json.loads(l)["loss"] for l in open(os.path.join(out, "metrics.jsonl"))]


def test_resume_gives_the_same_losses(tiny_model_dir, tmp_path):
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    run_train(*tiny_args(tiny_model_dir, full, max_steps=4))
    run_train(*tiny_args(tiny_model_dir, split, max_steps=2))
    assert sorted(os.listdir(split)) == ["checkpoint-2", "metrics.jsonl"]
    ck = os.path.join(split, "checkpoint-2")
    assert {"adapter", "trainer_state.json", "optimizer.bin"} <= set(os.listdir(ck))
    assert os.path.isfile(os.path.join(ck, "adapter", "adapter_model.safetensors"))
    assert os.path.getsize(os.path.join(ck, "model.safetensors")) < 1_000_000  # adapter only, not the base model
    with open(os.path.join(split, "metrics.jsonl"), "a") as f:  # a step logged after the checkpoint, then a crash
        f.write(json.dumps({"step": 3, "loss": -1.0}) + "\n")
    p = run_train(*tiny_args(tiny_model_dir, split, max_steps=4, resume_from_checkpoint="latest"))
    assert "resumed from" in p.stdout + p.stderr
    a, b = losses(full), losses(split)
    assert len(a) == len(b) == 4
    assert a == pytest.approx(b, rel=1e-6, abs=1e-9)
    assert a[0] != pytest.approx(a[3])  # the model did train
    m = json.loads(open(os.path.join(full, "metrics.jsonl")).readline())
    for k in ("loss", "weight_mean", "weight_min", "weight_max", "response_length", "truncated", "boxed", "correct", "tokens_per_s"):
        assert k in m
    assert 0.25 <= m["weight_min"] <= m["weight_mean"] <= m["weight_max"] <= 1.0


@pytest.mark.parametrize("extra,message", [
    (["--method", "nope"], "--method: unknown 'nope'"),
    (["--batch_size", "6", "--per_device_train_batch_size", "4"], "--batch_size 6 is not divisible"),
    (["--dataset", "missing.jsonl"], "missing.jsonl: no such file"),
    (["--resume_from_checkpoint", "/nonexistent"], "--resume_from_checkpoint: no such folder"),
    (["--max_stesp", "2"], "train.py: unknown flag --max_stesp (did you mean --max_steps?)"),
    (["--temp", "0.7"], "unknown flag --temp"),  # no abbreviations: --temp is not --temperature
    (["--temperature", "0"], "--temperature must be > 0"),
])
def test_bad_input_fails_in_one_line(tiny_model_dir, tmp_path, extra, message):
    p = run_train(*tiny_args(tiny_model_dir, str(tmp_path / "o"), max_steps=1), *extra, check=False)
    assert p.returncode != 0 and message in p.stderr.strip().splitlines()[-1]
    assert not os.path.exists(tmp_path / "o" / "metrics.jsonl")


def test_config_with_unknown_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: x\nlearning_rat: 1.0\n")
    p = run_train("--config", cfg, check=False)
    assert p.returncode != 0 and f"{cfg}: unknown key(s) learning_rat" in p.stderr


def test_long_prompts_are_skipped_and_counted(tiny_model_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    rows = [{"problem": f"What is {i} + {i}?", "solution": f"{i} + {i} = {2 * i}", "answer": str(2 * i)} for i in range(4)]
    rows.append({"problem": "long " * 600, "solution": "x", "answer": "1"})
    data.write_text("\n".join(json.dumps(r) for r in rows))
    p = run_train(*tiny_args(tiny_model_dir, str(tmp_path / "o"), max_steps=1, dataset=data, save_steps=100))
    assert "skipped 1 of 5 problems whose prompt exceeds --max_prompt_length 512" in p.stdout + p.stderr
