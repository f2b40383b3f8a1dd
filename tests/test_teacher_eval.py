"""--teacher ema (a second LoRA adapter, exact resume) and --eval_steps (evaluate.py's metrics of the live policy)."""
import json
import os
import subprocess
import sys
from collections import defaultdict

import pytest
import torch

from conftest import FIXTURES, ROOT
from test_train import losses, run_train, tiny_args
import pwopsd.ema


def tiny_peft(model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    return get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), lora), lora


def test_ema_adapter_is_the_base_at_start_then_follows_the_student(tiny_model_dir, tmp_path):
    from teacher import teacher_mode

    model, lora = tiny_peft(tiny_model_dir)
    rng = torch.get_rng_state()
    pwopsd.ema.add_ema_teacher(model, lora)
    assert torch.equal(rng, torch.get_rng_state())  # the overwritten init does not shift the run's random stream
    params = dict(model.named_parameters())
    ema_names = [n for n in params if ".ema." in n]
    assert len(ema_names) == 2 * 2 * 2  # (A, B) x (q, v) x 2 layers
    for n in ema_names:
        assert not params[n].requires_grad and params[n.replace(".ema.", ".default.")].requires_grad
        assert torch.equal(params[n], params[n.replace(".ema.", ".default.")])
    ids = torch.tensor([[1, 5, 9, 13, 200, 31]])
    with torch.no_grad(), model.disable_adapter():
        base = model(input_ids=ids).logits
    with torch.no_grad():  # a trained student: B != 0
        for n in ema_names:
            params[n.replace(".ema.", ".default.")].add_(0.05 * torch.randn_like(params[n]))
    with torch.no_grad():
        student = model(input_ids=ids).logits
    with teacher_mode(model, None, "ema") as t:
        teacher_start = t(input_ids=ids).logits
    assert torch.equal(teacher_start, base) and not torch.allclose(student, base, atol=1e-4)
    assert model.active_adapter == "default"  # switched back, grads as before
    assert all(params[n.replace(".ema.", ".default.")].requires_grad and not params[n].requires_grad for n in ema_names)

    ema = pwopsd.ema.ema_state(model)
    before = {n: e.detach().double().clone() for n, e, _, _ in ema}
    pwopsd.ema.update_ema_teacher(ema, 0.9)
    for n, e, s, m in ema:
        assert m is e  # float32: updated in place, no second copy
        torch.testing.assert_close(e.double(), 0.9 * before[n] + 0.1 * s.double(), atol=1e-7, rtol=0)
    with teacher_mode(model, None, "ema") as t:
        teacher_moved = t(input_ids=ids).logits
    assert not torch.allclose(teacher_moved, base, atol=1e-5) and not torch.allclose(teacher_moved, student, atol=1e-5)

    (tmp_path / "adapter").mkdir()
    lora.save_pretrained(tmp_path / "adapter")
    pwopsd.ema.save_ema_teacher(ema, tmp_path / "ema_adapter", tmp_path / "adapter" / "adapter_config.json")
    saved = {n: e.detach().clone() for n, e, _, _ in ema}
    pwopsd.ema.update_ema_teacher(ema, 0.0)  # = the student: changes every tensor
    pwopsd.ema.load_ema_teacher(ema, tmp_path / "ema_adapter")
    assert all(torch.equal(e, saved[n]) for n, e, _, _ in ema)


def ema_tensors(ckpt):
    from safetensors.torch import load_file

    return load_file(os.path.join(ckpt, "ema_adapter", "adapter_model.safetensors"))


def test_ema_teacher_trains_and_resumes_exactly(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    base, full, split = (str(tmp_path / x) for x in ("base", "full", "split"))
    ema = {"teacher": "ema", "teacher_ema_decay": 0.5}
    run_train(*tiny_args(tiny_model_dir, base, max_steps=2, save_steps=100))
    run_train(*tiny_args(tiny_model_dir, full, max_steps=4, save_steps=1, **ema))
    run_train(*tiny_args(tiny_model_dir, split, max_steps=2, **ema))
    p = run_train(*tiny_args(tiny_model_dir, split, max_steps=4, resume_from_checkpoint="latest", **ema))
    assert "resumed from" in p.stdout + p.stderr
    a, b, c = losses(full), losses(split), losses(base)
    # Step 1: the EMA teacher is the student at init (LoRA B = 0) = the base teacher; then it moves.
    assert a[0] == pytest.approx(c[0], rel=1e-6) and a[1] != pytest.approx(c[1], rel=1e-4)
    assert a == pytest.approx(b, rel=1e-6, abs=1e-9)
    e_full, e_split = ema_tensors(os.path.join(full, "checkpoint-4")), ema_tensors(os.path.join(split, "checkpoint-4"))
    assert e_full.keys() == e_split.keys() and all(torch.equal(e_full[k], e_split[k]) for k in e_full)
    # The update after each step: E_t = 0.5 E_(t-1) + 0.5 S_t, E_0 = S_0 (lora_B of S_0 is 0).
    e1, e2 = ema_tensors(os.path.join(full, "checkpoint-1")), ema_tensors(os.path.join(full, "checkpoint-2"))
    s1, s2 = (load_file(os.path.join(full, f"checkpoint-{k}", "adapter", "adapter_model.safetensors")) for k in (1, 2))
    assert e1.keys() == s1.keys()
    for k in e1:
        torch.testing.assert_close(e2[k], 0.5 * e1[k] + 0.5 * s2[k], atol=1e-7, rtol=0)
        if "lora_B" in k:
            torch.testing.assert_close(e1[k], 0.5 * s1[k], atol=1e-7, rtol=0)
            assert s1[k].abs().max() > 0
    assert not os.path.exists(os.path.join(full, "checkpoint-4", "adapter", "ema"))  # one copy, in ema_adapter/


def read_jsonl(path):
    return [json.loads(l) for l in open(path) if l.strip()]


def test_eval_during_training_logs_evaluate_py_metrics(tiny_model_dir, tmp_path):
    import evaluate as E
    from pwopsd import grading

    bench, out = str(FIXTURES / "aime_format.jsonl"), str(tmp_path / "run")
    flags = dict(eval_steps=1, eval_benchmarks=bench, eval_n=2, eval_limit=2, eval_max_new_tokens=8, eval_temperature=1.0)
    # A large step size: two steps must move the tiny policy enough to change some of its seeded eval samples.
    run_train(*tiny_args(tiny_model_dir, out, max_steps=2, save_steps=100, learning_rate=0.3, **flags))
    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert [(r["step"], "loss" in r) for r in rows] == [(0, False), (1, True), (1, False), (2, True), (2, False)]
    label = E.benchmark_label(bench)
    samples = {}
    for r in (r for r in rows if "loss" not in r):
        got = read_jsonl(os.path.join(out, "eval", f"step-{r['step']}", "samples.jsonl"))
        assert len(got) == 2 * 2
        for s in got:
            assert grading.grade(s["response"], s["reference"]) == (s["answer"], s["correct"])
        per_problem = defaultdict(list)
        for s in sorted(got, key=lambda s: s["sample"]):
            per_problem[s["problem_id"]].append(s)
        want = E.benchmark_metrics(list(per_problem.values()), 2)
        assert set(want) == {"avg@2", "pass@1", "pass@2", "maj@2", "mean_length", "truncation_rate"}
        for k, v in want.items():
            assert r[f"eval/{label}/{k}"] == pytest.approx(v) and r[f"eval/mean/{k}"] == pytest.approx(v)
        samples[r["step"]] = {(s["problem_id"], s["sample"]): s["response"] for s in got}
    assert samples[2] != samples[0]  # the current policy is evaluated, not a stale copy
    # Step 0 (the initial policy) reproduces evaluate.py on the base model with the same protocol.
    ev = str(tmp_path / "ev")
    p = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--model", tiny_model_dir, "--benchmarks", bench,
                        "--n", "2", "--limit", "2", "--seeds", "0", "--max_new_tokens", "8", "--rollout_backend", "hf",
                        "--rollout_temperature", "1.0", "--output_dir", ev], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert {(s["problem_id"], s["sample"]): s["response"] for s in read_jsonl(os.path.join(ev, "samples.jsonl"))} == samples[0]
    summary = json.load(open(os.path.join(ev, "summary.json")))
    for k, v in summary["benchmarks"][label]["mean"].items():
        assert rows[0][f"eval/{label}/{k}"] == pytest.approx(v)


@pytest.mark.parametrize("extra,message", [
    (["--teacher", "ema", "--use_lora", "false"], "--teacher ema keeps the EMA as a second LoRA adapter"),
    (["--teacher", "emma"], "--teacher: unknown 'emma'"),
    (["--teacher_ema_decay", "1.5"], "--teacher_ema_decay must be in [0, 1]"),
    (["--eval_steps", "1", "--eval_benchmarks", "aime42"], "--eval_benchmarks: unknown benchmark 'aime42'"),
    (["--eval_steps", "1", "--eval_benchmarks", "missing.jsonl"], "--eval_benchmarks: no such file missing.jsonl"),
])
def test_bad_teacher_and_eval_flags_fail_in_one_line(tiny_model_dir, tmp_path, extra, message):
    p = run_train(*tiny_args(tiny_model_dir, str(tmp_path / "o"), max_steps=1), *extra, check=False)
    assert p.returncode != 0 and message in p.stderr.strip().splitlines()[-1]
