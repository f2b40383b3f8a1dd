"""The study's pieces: the sft method row, the clip variants, the held-out demo split, mini_repro --quick."""
import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch

import data
import loss as L
from conftest import ROOT


# --------------------------------------------------------------------------------------------------
# The point-wise clip's inverted gradient, and the two variants (a 4-token vocabulary)
# --------------------------------------------------------------------------------------------------
T, C = 1.1, 0.05
P_T = torch.tensor([0.87, 0.13 / 3, 0.13 / 3, 0.13 / 3], dtype=torch.float64)  # the teacher is sure of token 0
P_S = torch.tensor([0.068, 0.932 / 3, 0.932 / 3, 0.932 / 3], dtype=torch.float64)  # the student is not


def four_token(mode):
    """(loss, d loss / d z_S) of the 4-token example; logits = T log p, so softmax(logits / T) = p."""
    z_s = (T * P_S.log()).requires_grad_(True)
    l = L.clipped_forward_kl(z_s[None], (T * P_T.log())[None], T, C, clip_mode=mode)[0]
    (g,) = torch.autograd.grad(l, z_s)
    return l.item(), g


def test_pointwise_clip_lowers_the_teachers_top1():
    l, g = four_token("pointwise")
    # Token 0's entry 0.87 ln(0.87/0.068) = 2.22 is clipped to 0.05; the other three are -0.0853 each.
    assert l == pytest.approx(0.05 + 3 * (0.13 / 3) * math.log((0.13 / 3) / (0.932 / 3)), abs=1e-6)  # float32 inside
    assert round(l, 3) == -0.206
    # Gradient = (p_S(u) M - m_u p_T(u)) / T with M = 0.13 (unclipped teacher mass): +0.068 * 0.13 / 1.1
    assert g[0].item() == pytest.approx(0.068 * 0.13 / T, rel=1e-5)
    assert round(g[0].item(), 3) == 0.008  # > 0: a descent step lowers the student's logit of the teacher's top-1


@pytest.mark.parametrize("mode", ["total", "scaled"])
def test_variants_raise_the_teachers_top1(mode):
    l, g = four_token(mode)
    x = P_T * (P_T.log() - P_S.log())  # the forward-KL entries
    if mode == "total":  # value min(KL, c); gradient (c / KL) x the forward KL's, (p_S - p_T) / T
        assert l == pytest.approx(C, abs=1e-7)
        torch.testing.assert_close(g, (C / x.sum()) * (P_S - P_T) / T, rtol=1e-5, atol=1e-7)
    else:  # value = the point-wise clip's; token 0's entry keeps its gradient x c / x_0
        assert round(l, 3) == -0.206
        s = torch.where(x > C, C / x, torch.ones_like(x))
        torch.testing.assert_close(g, (P_S * (s * P_T).sum() - s * P_T) / T, rtol=1e-5, atol=1e-7)
    assert g[0].item() < 0  # descent raises the student's probability of the teacher's top-1
    assert round(g[0].item(), 4) == {"total": -0.0186, "scaled": -0.0086}[mode]


def test_clip_modes_agree_without_clipped_entries_and_reject_unknown():
    torch.manual_seed(0)
    s, t = torch.randn(6, 11), torch.randn(6, 11)
    ref = L.clipped_forward_kl(s, t, T, 0.0)
    for mode in L.CLIP_MODES:
        torch.testing.assert_close(L.clipped_forward_kl(s, t, T, 0.0, mode), ref)  # clip 0: plain forward KL
        torch.testing.assert_close(L.clipped_forward_kl(s, t, T, 100.0, mode), ref)  # nothing reaches c
    with pytest.raises(ValueError, match="--clip_mode"):
        L.clipped_forward_kl(s, t, T, C, "nope")


# --------------------------------------------------------------------------------------------------
# sft: cross-entropy of the reference solution under the student prompt
# --------------------------------------------------------------------------------------------------
def test_sft_loss_is_the_hand_computed_cross_entropy(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import rollout as R
    from teacher import completion_hidden_states, lm_head_weight

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    probs = data.load_problems("demo-arithmetic", limit=3)
    prompts = [R.encode(tok, R.student_prompt(tok, r["problem"])) for r in probs]
    refs = [R.encode(tok, r["solution"]) + [tok.eos_token_id] for r in probs]
    lengths = torch.tensor([len(r) for r in refs])
    h = completion_hidden_states(model, prompts, refs, tok.pad_token_id)
    coef = L.token_coefficients(lengths, L.uniform_weights(lengths), "token", float(lengths.sum()), 3.0)
    hp = type("HP", (), {"temperature": 1.1})()
    ctx = L.LossContext(tokens=torch.tensor(sum(refs, [])), lengths=lengths, coef=coef, total_tokens=float(lengths.sum()),
                        total_sequences=3.0, step=0)
    got, stats = L.sft_loss(h @ lm_head_weight(model).T, None, ctx, hp)
    # By hand: each sequence alone through the plain model, CE of its reference tokens, averaged over all tokens.
    nll = []
    with torch.no_grad():
        for p, r in zip(prompts, refs):
            logits = model(input_ids=torch.tensor([p + r])).logits[0, len(p) - 1:-1].double()
            nll += (-logits.log_softmax(-1)[torch.arange(len(r)), torch.tensor(r)]).tolist()
    assert got.item() == pytest.approx(sum(nll) / len(nll), rel=1e-5)
    assert got.item() == pytest.approx(math.log(len(tok)), rel=0.05)  # a random model: ~ln V nats per token
    assert 0.0 <= stats["token_accuracy"] <= 1.0


def run_train(*args):
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return p


@pytest.mark.parametrize("prompts", ["student", "both"])
def test_train_sft_step1_loss_is_the_reference_cross_entropy(tiny_model_dir, tmp_path, prompts):
    """train.py --method sft: step 1's logged loss is the CE of that step's reference solutions (+ EOS)
    under the student prompt (or, with --sft_prompts both, under whichever prompt each copy carries)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import rollout as R
    from teacher import teacher_prompt

    out = tmp_path / "sft"
    run_train("--model", tiny_model_dir, "--dataset", "demo-arithmetic", "--method", "sft", "--sft_prompts", prompts,
              "--batch_size", 4, "--per_device_train_batch_size", 2, "--max_prompt_length", 512, "--rollout_backend", "hf",
              "--lora_r", 4, "--lora_alpha", 8, "--learning_rate", 1e-2, "--max_steps", 2, "--save_steps", 2,
              "--output_dir", out, "--seed", 3)
    m = [json.loads(l) for l in open(out / "metrics.jsonl")]
    assert m[0]["correct"] == 1.0 and m[0]["truncated"] == 0.0  # the "rollouts" are the reference solutions
    assert m[1]["loss"] < m[0]["loss"]  # lr 1e-2 on the same kind of text: the CE drops
    # Reproduce step 1's batch (train.step_batch: seeded permutation of the data) and its CE by hand.
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    probs = data.load_problems("demo-arithmetic")
    items = [(R.encode(tok, R.student_prompt(tok, r["problem"])), r) for r in probs]
    if prompts == "both":
        items += [(R.encode(tok, teacher_prompt(tok, r["problem"], r["solution"])), r) for r in probs]
    order = random.Random(3).sample(range(len(items)), len(items))[:4]
    nll = []
    with torch.no_grad():
        for i in order:
            p, r = items[i]
            ref = R.encode(tok, r["solution"]) + [tok.eos_token_id]
            logits = model(input_ids=torch.tensor([p + ref])).logits[0, len(p) - 1:-1].double()
            nll += (-logits.log_softmax(-1)[torch.arange(len(ref)), torch.tensor(ref)]).tolist()
    assert m[0]["loss"] == pytest.approx(sum(nll) / len(nll), rel=1e-4)


def test_bad_clip_mode_and_sft_prompts_fail_in_one_line(tiny_model_dir, tmp_path):
    for flag, value in (("--clip_mode", "nope"), ("--sft_prompts", "nope")):
        p = subprocess.run([sys.executable, str(ROOT / "train.py"), "--model", tiny_model_dir, "--dataset", "demo-arithmetic",
                            flag, value, "--output_dir", str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True)
        assert p.returncode != 0 and f"{flag}: unknown 'nope'" in p.stderr.strip().splitlines()[-1]


# --------------------------------------------------------------------------------------------------
# The held-out split and the flat variant
# --------------------------------------------------------------------------------------------------
def test_heldout_split_is_disjoint_and_fixed():
    train = data.load_problems("demo-arithmetic")
    test = data.load_problems("demo-arithmetic-test")
    assert len(train) == 2000 and len(test) == 500
    assert not {r["problem"] for r in train} & {r["problem"] for r in test}
    assert len({r["problem"] for r in test}) > 490  # a different seed, not a copy
    assert data.load_problems("demo-arithmetic-test", limit=200) == test[:200]  # a prefix: limits nest
    assert test[0]["id"] == "demo-test-0" and test[0]["answer"] == data.last_boxed(test[0]["solution"])


def test_flat_variant_has_the_same_problems_and_one_line_solutions():
    steps, flat = data.load_problems("demo-arithmetic-test", limit=50), data.load_problems("demo-arithmetic-flat-test", limit=50)
    assert [(r["problem"], r["answer"]) for r in steps] == [(r["problem"], r["answer"]) for r in flat]
    for r in flat:
        body, last = r["solution"].split("\n")
        lhs, rhs = body.split(" has ", 1)[1].split(" = ")
        assert eval(lhs) == int(rhs.split()[0]) == int(r["answer"]) and last == f"The answer is \\boxed{{{r['answer']}}}."
    gives = [r for r in flat if " - " in r["solution"]]
    assert gives and len(gives) < len(flat)  # both problem shapes occur
    with pytest.raises(ValueError, match="unknown style"):
        data.demo_arithmetic(2, 0, style="nope")


def test_evaluate_accepts_the_heldout_split():
    import evaluate

    a = evaluate.parse_args(["--model", "x", "--benchmarks", "demo-arithmetic-test", "--limit", "3"])
    evaluate.check_args(a)  # no error: a known benchmark name
    assert [p["id"] for p in evaluate.load_benchmark("demo-arithmetic-test", a)] == ["demo-test-0", "demo-test-1", "demo-test-2"]


# --------------------------------------------------------------------------------------------------
# bench/mini_repro.py --quick on the tiny model (HF backend): the pipeline and its bookkeeping, not a gain
# --------------------------------------------------------------------------------------------------
def test_mini_repro_quick_runs_and_reports(tiny_model_dir, tmp_path):
    out, log = tmp_path / "mr", tmp_path / "runs.jsonl"
    cmd = [sys.executable, str(ROOT / "bench" / "mini_repro.py"), "--quick", "--model", tiny_model_dir, "--base", tiny_model_dir,
           "--rows", "sft", "opsd", "--output_dir", str(out), "--log", str(log), "--heldout", "4", "--max_new_tokens", "8",
           "--rollout_backend", "hf", "--clip_inversion", "--", "--max_new_tokens", "8"]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    warm = "warm start (start of the distillation rows)"
    assert list(s["summary"]) == ["base", "sft", warm, "opsd"]
    assert s["curves"]["opsd"][0].keys() == {"0", "1", "2"}  # --quick: 2 steps, evaluated at every step
    lines = [json.loads(l) for l in open(log)]
    evals = [l for l in lines if l["name"].startswith("eval:")]
    runs = [l for l in lines if not l["name"].startswith("eval:")]
    # One start-model evaluation (--base = --model here), before the runs; the runs (2 at a time) in any order.
    assert [l["name"] for l in evals] == [f"eval:{tiny_model_dir}"] and lines[0] is evals[0]
    assert sorted((l["name"], l["seed"]) for l in runs) == [("opsd", 0), ("sft", 0)]
    assert all(0 <= l["before"] <= 1 and 0 <= l["after"] <= 1 and len(l["loss"]) == 2 for l in runs)
    # Step 0 of both runs is that evaluation's student-prompt result, not a second measurement.
    assert {l["before"] for l in runs} == {evals[0]["student_prompt"]} == {s["summary"]["base"]["mean"]}
    table = (out / "table.md").read_text()
    # header, rule, base, sft, warm start, opsd, blank, teacher, blank, row differences (same start model here),
    # blank, the --clip_inversion table: header, rule, opsd-s0
    assert table.count("\n") == 14 and "| opsd | 1 |" in table and "\n| opsd-s0 | 2 | " in table
    row = next(l for l in table.splitlines() if l.startswith("| opsd |")).split(" | ")
    opsd = next(l for l in runs if l["name"] == "opsd")
    d = float(row[4].split(" (")[0])  # the paired change column: seed-averaged after - before
    assert d == pytest.approx(opsd["after"] - opsd["before"], abs=1e-3)
    assert f"opsd - sft: {s['summary']['opsd']['mean'] - s['summary']['sft']['mean']:+.3f} (" in table
    # --clip_inversion: the distillation run measured each of its 2 steps; the sft run is not measured
    ci = opsd["clip_inversion"]
    assert len(ci["tokens"]) == 2 and all(t > 0 for t in ci["tokens"]) and "clip_inversion" not in \
        next(l for l in runs if l["name"] == "sft")
    assert len((out / "runs" / "opsd-s0.clip.jsonl").read_text().splitlines()) == 2
    assert "privileged teacher prompt" in table and f"base {evals[0]['teacher_prompt']:.3f}" in table
    assert (out / "accuracy_vs_step.png").stat().st_size > 1000
    # A rerun reuses the finished runs and the start model's evaluation: nothing is trained or logged again.
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0 and len(open(log).readlines()) == 3


def test_train_routes_clip_mode_total(tiny_model_dir, tmp_path):
    """--clip_mode total with a tiny c: every token's loss is min(KL_t, c) = c, so OPSD's token mean is c --
    which the paper's point-wise clip (the chunked default path) would not give."""
    out = tmp_path / "total"
    run_train("--model", tiny_model_dir, "--dataset", "demo-arithmetic", "--method", "opsd", "--clip_mode", "total",
              "--clip", 1e-6, "--batch_size", 2, "--per_device_train_batch_size", 2, "--max_new_tokens", 6,
              "--max_prompt_length", 512, "--rollout_backend", "hf", "--lora_r", 4, "--lora_alpha", 8, "--max_steps", 1,
              "--output_dir", out, "--seed", 1)
    m = json.loads(open(out / "metrics.jsonl").readline())
    assert m["loss"] == pytest.approx(1e-6, rel=1e-4)
