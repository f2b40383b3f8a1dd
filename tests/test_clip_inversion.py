"""bench/clip_inversion.py against a direct computation: plain HF forwards of the initial model and of the step-1
checkpoint's adapter on the captured rollouts (no packing, no train.py code)."""
import json
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))


def logits_at_completion(model, prompt, completion):
    """[len(completion), V] logits predicting each completion token, from one unpacked forward."""
    ids = torch.tensor([list(prompt) + list(completion)])
    with torch.no_grad():
        out = model(input_ids=ids).logits[0].float()
    return out[len(prompt) - 1:len(prompt) + len(completion) - 1]


@pytest.mark.slow  # a train.py run in-process (~30 s); tests/conftest.py's SLOW_TESTS is edited elsewhere right now
def test_one_step_matches_a_direct_computation(peaked_model_dir, tmp_path):
    import clip_inversion
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out_dir, jsonl = tmp_path / "run", tmp_path / "ci.jsonl"
    T, c = 1.1, 0.05
    argv = ["--model", peaked_model_dir, "--dataset", "demo-arithmetic", "--batch_size", "2",
            "--per_device_train_batch_size", "1", "--num_generations", "2", "--max_new_tokens", "8",
            "--max_prompt_length", "512", "--rollout_backend", "hf", "--lora_r", "4", "--lora_alpha", "8",
            "--learning_rate", "3e-2", "--max_grad_norm", "1.0", "--max_steps", "1", "--output_dir", str(out_dir),
            "--seed", "3", "--method", "pwopsd", "--clip", str(c), "--temperature", str(T)]
    seen = []  # the caller's own hook is chained: called at step 0 and after the step's measurement
    (rec,) = clip_inversion.measure(argv, str(jsonl), keep=True, on_step=lambda run, step: seen.append(step))
    assert seen == [0, 1]
    assert json.loads(jsonl.read_text())["clipped_tokens"] == rec["clipped_tokens"]
    before = rec["_before"]
    assert len(before["seqs"]) == 4 and rec["tokens"] == sum(len(x) for x in before["comps"])

    base = AutoModelForCausalLM.from_pretrained(peaked_model_dir, dtype=torch.float32).eval()
    t_rows, s_rows = [], []
    for s, comp in zip(before["seqs"], before["comps"]):
        t_rows.append(logits_at_completion(base, s["teacher_ids"], comp))
        s_rows.append(logits_at_completion(base, s["student_ids"], comp))  # LoRA B = 0: the student starts as the base
    lp_t, lp_s = (F.log_softmax(torch.cat(r) / T, -1) for r in (t_rows, s_rows))
    vstar = lp_t.argmax(-1)
    t_top, s_before = lp_t.gather(-1, vstar[:, None])[:, 0], lp_s.gather(-1, vstar[:, None])[:, 0]
    clipped = t_top.exp() * (t_top - s_before) > c
    after_model = PeftModel.from_pretrained(base, str(out_dir / "checkpoint-1" / "adapter")).eval()
    s_after = torch.cat([logits_at_completion(after_model, s["student_ids"], comp)
                         for s, comp in zip(before["seqs"], before["comps"])])
    s_after = F.log_softmax(s_after / T, -1).gather(-1, vstar[:, None])[:, 0]
    d = s_after - s_before

    assert torch.equal(before["vstar"], vstar)
    assert torch.equal(before["clipped"], clipped)
    assert 0 < int(clipped.sum()) < len(clipped)  # both classes present, so both means are checked
    assert rec["clipped_tokens"] == int(clipped.sum())
    assert rec["clipped_frac"] == pytest.approx(clipped.float().mean().item())
    assert rec["lr"] == pytest.approx(3e-2)
    assert rec["dlogp_clipped"] == pytest.approx(d[clipped].mean().item(), rel=1e-3, abs=1e-5)
    assert rec["dlogp_unclipped"] == pytest.approx(d[~clipped].mean().item(), rel=1e-3, abs=1e-5)
    assert rec["fell_clipped"] == pytest.approx((d[clipped] < 0).float().mean().item())
    assert abs(rec["dlogp_clipped"]) > 1e-4  # the step did change the student
    assert rec["method"] == "pwopsd" and rec["clip_mode"] == "pointwise"


def test_step_record_and_table_on_known_numbers():
    import clip_inversion

    before = {"logp_before": torch.tensor([-1.0, -2.0, -3.0, -4.0]), "clipped": torch.tensor([True, False, True, False]),
              "x_star": torch.tensor([0.2, 0.0, 0.4, 0.01])}
    rec = clip_inversion.step_record(2, 1e-4, before, torch.tensor([-1.5, -1.0, -2.9, -4.0]))
    assert rec["tokens"] == 4 and rec["clipped_tokens"] == 2 and rec["clipped_frac"] == 0.5
    assert rec["dlogp_clipped"] == pytest.approx((-0.5 + 0.1) / 2)
    assert rec["dlogp_unclipped"] == pytest.approx(0.5)
    assert rec["fell_clipped"] == 0.5 and rec["fell_unclipped"] == 0.0
    assert rec["x_star_clipped"] == pytest.approx(0.3)
    none = clip_inversion.step_record(1, 1e-4, {**before, "clipped": torch.zeros(4, dtype=torch.bool)}, before["logp_before"])
    assert none["dlogp_clipped"] is None and none["clipped_frac"] == 0.0
    assert "| 2 | 0.0001 | 4 | 0.5 | -0.2 | 0.5 | 0.5 | 0 |" in clip_inversion.table([rec])
