"""Method variants: EOPD, REOPOLD, sampled-token reverse KL, the 2x2 reduction ablation, pwopsd-linear.

The unit tests share one hand-built batch -- 2 sequences x 3 tokens, vocabulary 5 (N = 6, V = 5) -- and
compute every expected loss, gradient and diagnostic independently, in float64 Python loops from the
formulas. The end-to-end test trains a tiny random model with every ``--method`` through ``train.main``.
"""
import dataclasses
import inspect
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import loss as L
import train
from conftest import ROOT

T = 1.1
# Student / teacher logits and the sampled tokens. Chosen so that: the teacher's entropy is below 0.8 at
# tokens 0 and 5 and above it elsewhere (EOPD's gate); rewards at tokens 2 and 5 fall below REOPOLD's
# floor log(1/9) = -2.197; the two highest student entropies (tokens 5, 4) sit in the same sequence, so a
# per-micro-batch top-20 % would pick different tokens; no ties among the teacher's top 3.
S = [[2.0, 0.5, -1.0, 0.0, 1.0],
     [0.0, 2.0, 0.1, -0.2, 0.2],
     [3.0, -1.0, 0.0, 0.5, -2.0],
     [0.5, 1.5, 0.0, -0.5, 1.0],
     [1.0, 1.0, 1.0, 0.0, -1.0],
     [0.5, 0.0, 0.8, 0.2, 0.6]]
TT = [[4.0, 0.1, -1.0, 0.5, 0.0],
      [0.2, 0.0, 0.4, 0.1, -0.3],
      [-1.5, 0.0, 2.0, 1.0, 0.5],
      [0.0, 1.0, 0.8, -1.0, 0.3],
      [2.0, -0.5, 1.5, 0.0, 0.2],
      [0.1, 3.5, -2.0, 0.5, 0.0]]
Y = [0, 4, 0, 1, 2, 2]
COEF = [0.05, 0.10, 0.15, 0.20, 0.25, 0.30]  # arbitrary: the losses must honour ctx["coef"]


# ---- independent reference: plain Python, float64 ---------------------------------------------------
def log_softmax(z):
    z = [v / T for v in z]
    m = max(z)
    lse = m + math.log(sum(math.exp(v - m) for v in z))
    return [v - lse for v in z]


def entropy(lp):
    return -sum(math.exp(a) * a for a in lp)


LS = [log_softmax(z) for z in S]
LT = [log_softmax(z) for z in TT]
R = [LT[i][Y[i]] - LS[i][Y[i]] for i in range(6)]  # sampled-token reward / advantage
H_S = [entropy(lp) for lp in LS]
H_T = [entropy(lp) for lp in LT]
FLOOR = math.log(0.1 / 0.9)


def dlogp(i, v):
    """d log p_S(y_i) / d z_S(i, v) at temperature T."""
    return ((v == Y[i]) - math.exp(LS[i][v])) / T


def hp(**over):
    return dataclasses.replace(train.Args(), **over)


def run(fn, args, coef=COEF, step=0, rows=range(6), **extra):
    """Call a loss on rows of the example; return (loss, d loss / d student logits [len(rows), V], stats)."""
    s = torch.tensor([S[i] for i in rows], requires_grad=True)
    ctx = L.LossContext(**{"tokens": torch.tensor([Y[i] for i in rows]), "lengths": torch.tensor([3] * (len(rows) // 3)),
           "coef": torch.tensor([coef[i] for i in rows]), "total_tokens": 6.0, "total_sequences": 2.0, "step": step, **extra})
    loss, stats = fn(s, torch.tensor([TT[i] for i in rows]), ctx, args)
    loss.backward()
    return loss.item(), s.grad.double(), stats


def test_example_exercises_every_branch():
    assert [h > 0.8 for h in H_T] == [False, True, True, True, True, False]
    assert [r >= FLOOR for r in R] == [True, True, False, True, True, False]
    assert sorted(range(6), key=lambda i: -H_S[i])[:2] == [5, 4]


def test_defaults_are_the_papers():
    a = train.Args()
    assert (a.temperature, a.eopd_clip_eps, a.eopd_entropy_threshold, a.eopd_top_k) == (1.1, 0.2, 0.8, 16)
    assert (a.reopold_lambda, a.reopold_switch_step, a.reopold_entropy_top) == (0.1, 50, 0.2)
    assert L.METHODS["eopd"] == ("eopd", "uniform", "token") and L.METHODS["sampled_rkl"] == ("sampled_rkl", "uniform", "token")


@pytest.mark.parametrize("fn", [L.sampled_rkl_loss, L.eopd_loss, L.reopold_loss])
def test_variant_is_one_short_documented_function(fn):
    assert len(inspect.getsource(fn).splitlines()) <= 40
    assert "=" in fn.__doc__ and ("arXiv" in fn.__doc__ or "MiniLLM" in fn.__doc__)


# ---- sampled-token reverse KL -----------------------------------------------------------------------
def test_sampled_rkl_value_and_gradient():
    loss, grad, stats = run(L.sampled_rkl_loss, hp())
    assert loss == pytest.approx(-sum(COEF[i] * R[i] * LS[i][Y[i]] for i in range(6)), abs=1e-6)
    expected = [[-COEF[i] * R[i] * dlogp(i, v) for v in range(5)] for i in range(6)]
    torch.testing.assert_close(grad, torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=1e-5)
    assert stats["rkl_k1"] == pytest.approx(-sum(R) / 6, abs=1e-6)


# ---- EOPD -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [2, 3, 16])  # 16 > V: the whole vocabulary, q = p_T (no renormalisation)
def test_eopd_value_gradient_gate_and_topk(k):
    loss, grad, stats = run(L.eopd_loss, hp(eopd_top_k=k))
    want_loss, want_grad, kls = 0.0, [], []
    for i in range(6):
        top = sorted(range(5), key=lambda v: -TT[i][v])[: min(k, 5)]
        z = sum(math.exp(LT[i][v]) for v in top)
        q = {v: math.exp(LT[i][v]) / z for v in top}  # teacher renormalised over its top-k
        kl = sum(q[v] * (math.log(q[v]) - LS[i][v]) for v in top)
        gate = H_T[i] > 0.8
        kls += [kl] if gate else []
        # on-policy ratio 1: pg = -min(A, clip(1) A) = -A; its gradient is -A d log p_S(y)
        want_loss += COEF[i] * (-R[i] + gate * kl)
        want_grad.append([COEF[i] * (-R[i] * dlogp(i, v) + gate * (math.exp(LS[i][v]) - q.get(v, 0.0)) / T)
                          for v in range(5)])
    assert loss == pytest.approx(want_loss, abs=1e-6)
    torch.testing.assert_close(grad, torch.tensor(want_grad, dtype=torch.float64), atol=1e-6, rtol=1e-5)
    assert stats["high_entropy_frac"] == pytest.approx(4 / 6)
    assert stats["clip_frac"] == 0.0
    assert stats["topk_kl"] == pytest.approx(sum(kls) / len(kls), abs=1e-6)
    assert stats["advantage_mean"] == pytest.approx(sum(R) / 6, abs=1e-6)


def test_eopd_gate_threshold_is_a_flag():
    closed, _, stats = run(L.eopd_loss, hp(eopd_entropy_threshold=10.0))  # no token gated: PG term only
    assert stats["high_entropy_frac"] == 0.0
    assert closed == pytest.approx(-sum(COEF[i] * R[i] for i in range(6)), abs=1e-6)


# ---- REOPOLD ----------------------------------------------------------------------------------------
def reopold_expected(mask):
    """-sum(R^ M log p_S(y)) / sum(M) and its gradient, from the explicit mask."""
    r_hat = [max(r, FLOOR) for r in R]
    total = sum(mask)
    loss = -sum(r_hat[i] * LS[i][Y[i]] for i in range(6) if mask[i]) / total
    grad = [[-r_hat[i] * mask[i] * dlogp(i, v) / total for v in range(5)] for i in range(6)]
    return loss, torch.tensor(grad, dtype=torch.float64)


@pytest.mark.parametrize("step", [0, 49])
def test_reopold_phase_one_keeps_rewards_above_the_floor(step):
    loss, grad, stats = run(L.reopold_loss, hp(), step=step)
    want_loss, want_grad = reopold_expected([r >= FLOOR for r in R])  # tokens 2 and 5 dropped: sum(M) = 4
    assert loss == pytest.approx(want_loss, abs=1e-6)
    torch.testing.assert_close(grad, want_grad, atol=1e-6, rtol=1e-5)
    assert stats["mask_frac"] == pytest.approx(4 / 6) and stats["floor_frac"] == 0.0
    assert stats["reward_mean"] == pytest.approx(sum(R) / 6, abs=1e-6)


@pytest.mark.parametrize("step", [50, 120])
def test_reopold_phase_two_keeps_top_entropy_tokens_with_floored_rewards(step):
    loss, grad, stats = run(L.reopold_loss, hp(), step=step)
    k = math.ceil(0.2 * 6)  # 2 tokens
    top = sorted(range(6), key=lambda i: -H_S[i])[:k]
    want_loss, want_grad = reopold_expected([i in top for i in range(6)])
    assert loss == pytest.approx(want_loss, abs=1e-6)
    torch.testing.assert_close(grad, want_grad, atol=1e-6, rtol=1e-5)
    assert stats["mask_frac"] == pytest.approx(2 / 6)
    assert stats["floor_frac"] == pytest.approx(0.5)  # token 5's reward -3.85 was raised to the floor
    assert stats["entropy_threshold"] == pytest.approx(min(H_S[i] for i in top), abs=1e-6)


@pytest.mark.parametrize("step", [0, 50])
def test_reopold_batch_is_the_whole_step_across_micro_batches(step):
    """Split into two micro-batches (one sequence each) with the step's statistics from train.py's pre-pass:
    the summed losses and gradients equal the one-batch ones. Without them each micro-batch would use its own
    mask normaliser / entropy threshold, which differs here."""
    args = hp()
    full_loss, full_grad, _ = run(L.reopold_loss, args, step=step)
    step_stats = L.reopold_token_stats(torch.tensor(S), torch.tensor(TT), torch.tensor(Y), args)
    parts = [run(L.reopold_loss, args, step=step, rows=rows, token_stats=step_stats[rows.start:rows.stop],
                 step_token_stats=step_stats) for rows in (range(0, 3), range(3, 6))]
    assert sum(p[0] for p in parts) == pytest.approx(full_loss, abs=1e-6)
    torch.testing.assert_close(torch.cat([p[1] for p in parts]), full_grad, atol=1e-6, rtol=1e-5)
    local = sum(run(L.reopold_loss, args, step=step, rows=rows)[0] for rows in (range(0, 3), range(3, 6)))
    assert local != pytest.approx(full_loss, abs=1e-3)


def test_reopold_empty_mask_gives_zero_loss_and_gradient():
    loss, grad, stats = run(L.reopold_loss, hp(reopold_lambda=0.99))  # floor log(99) = 4.6 > every reward
    assert loss == 0.0 and stats["mask_frac"] == 0.0
    assert torch.count_nonzero(grad) == 0


# ---- pwopsd-linear, the README's "Add your own variant" example ------------------------------------
def test_linear_weighting_and_its_method_entry():
    w = L.WEIGHTINGS["linear"](torch.tensor([3, 2]), w_min=0.25)
    torch.testing.assert_close(w, torch.tensor([0.25 + 0.75 * 0.5 / 3, 0.25 + 0.75 * 1.5 / 3, 0.25 + 0.75 * 2.5 / 3,
                                                0.25 + 0.75 * 0.5 / 2, 0.25 + 0.75 * 1.5 / 2]))
    assert L.METHODS["pwopsd-linear"] == ("clipped_fkl", "linear", "sequence")


# ---- flags ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra,message", [
    (["--method", "reopold", "--reduction", "sequence"], "--method reopold normalises by sum(M) itself"),
    (["--reopold_lambda", "1.0"], "--reopold_lambda must be in (0, 1)"),
    (["--eopd_top_k", "0"], "--eopd_top_k must be > 0"),
])
def test_bad_variant_flags_fail_in_one_line(extra, message):
    with pytest.raises(SystemExit, match=message.replace("(", r"\(").replace(")", r"\)")):
        train.parse_args(["--model", "x", *extra])


# ---- end to end: every method trains, the ablation overrides apply, the batch is the whole step ---------
HARNESS = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import torch
import loss as L, rollout as R, train
import pwopsd.engine as engines
torch.set_num_threads(1)  # tiny model: threads only add contention on a shared CPU (10x slower there)

# Cut the rollouts to lengths 3, 6, 9, 3 (a random model never stops): sequence lengths and micro-batch
# token counts differ, so token vs sequence reduction and per-micro-batch vs global normalisers differ.
generate = engines.generate_hf
def uneven(*a, **k):
    out = generate(*a, **k)
    for i, r in enumerate(out):
        r.completion_ids = r.completion_ids[: 3 + 3 * (i % 3)]
    record["lengths"].append([len(r.completion_ids) for r in out])
    return out
engines.generate_hf = uneven

chunked = L.FAST_PATHS["clipped_fkl", "chunked"]  # record the per-token clipped forward KL l_t
def recorded(*a, **k):
    loss, per_token = chunked(*a, **k)
    record["per_token"].append(per_token.tolist())
    return loss, per_token
L.FAST_PATHS["clipped_fkl", "chunked"] = recorded

for out, argv in json.loads(sys.argv[2]):
    record = {"lengths": [], "per_token": []}
    train.main(argv)
    json.dump(record, open(out + "/record.json", "w"))
"""


def test_every_method_trains_with_global_normalisers(tiny_model_dir, tmp_path):
    data = tmp_path / "problems.jsonl"  # 8 problems: tokenising the 2000 demo ones would dominate the runtime
    data.write_text("\n".join(json.dumps({"problem": f"What is {i} + {2 * i}?", "solution": f"{i} + {2 * i} = {3 * i}",
                                          "answer": str(3 * i)}) for i in range(1, 9)))
    base = {"model": tiny_model_dir, "dataset": data, "batch_size": 4, "max_new_tokens": 12,
            "rollout_backend": "hf", "lora_r": 4, "lora_alpha": 8, "learning_rate": 1e-2, "max_grad_norm": 1.0,
            "save_steps": 100, "seed": 1, "per_device_train_batch_size": 2, "max_steps": 1}
    runs = {  # name: flags over base
        "opsd": {"method": "opsd"}, "opsd-seq": {"method": "opsd", "reduction": "sequence"},
        "pwopsd": {"method": "pwopsd"}, "pwopsd-tok": {"method": "pwopsd", "reduction": "token"},
        "pwopsd-linear": {"method": "pwopsd-linear", "max_steps": 2},
        "eopd": {"method": "eopd", "max_steps": 2}, "sampled_rkl": {"method": "sampled_rkl", "max_steps": 2},
        "reopold": {"method": "reopold", "reopold_switch_step": 1, "max_steps": 2},  # step 1: rewards; 2: entropy
        "reopold-ent": {"method": "reopold", "reopold_switch_step": 0},
    }
    for name in ("eopd", "sampled_rkl", "reopold", "reopold-ent"):  # the same step 1 as one micro-batch
        runs[name + "/1mb"] = {**runs[name], "per_device_train_batch_size": 4, "max_steps": 1}
    jobs = [(str(tmp_path / name.replace("/", "_")),
             [x for k, v in {**base, **over, "output_dir": str(tmp_path / name.replace("/", "_"))}.items()
              for x in (f"--{k}", str(v))]) for name, over in runs.items()]
    p = subprocess.run([sys.executable, "-c", HARNESS, str(ROOT), json.dumps(jobs)], cwd=ROOT, capture_output=True,
                       text=True, timeout=900, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    metrics = {name: [json.loads(l) for l in open(out + "/metrics.jsonl")] for (out, _), name in zip(jobs, runs)}
    records = {name: json.load(open(out + "/record.json")) for (out, _), name in zip(jobs, runs)}

    for name, m in metrics.items():
        assert len(m) == runs[name].get("max_steps", 1)
        assert all(math.isfinite(s["loss"]) and s["grad_norm"] > 0 for s in m), (name, m)

    # The 2x2 ablation: the logged step-1 loss is sum_t w_t l_t / (normaliser) with the overridden weighting
    # and reduction, from the same recorded l_t (same seed, same initial model -> same rollouts).
    lengths = records["opsd"]["lengths"][0]
    assert lengths == [3, 6, 9, 3]
    l_t = sum(records["opsd"]["per_token"][:2], [])  # step 1 = the first two micro-batches
    for name in ("opsd-seq", "pwopsd", "pwopsd-tok", "pwopsd-linear"):
        torch.testing.assert_close(sum(records[name]["per_token"][:2], []), l_t)
    seq = [i for i, n in enumerate(lengths) for _ in range(n)]
    frac = [(t + 0.5) / n for n in lengths for t in range(n)]
    weights = {"uniform": [1.0] * len(l_t), "position": [0.25 + 0.75 / (1 + math.exp(-(f - 0.3) / 0.1)) for f in frac],
               "linear": [0.25 + 0.75 * f for f in frac]}

    def expected(weighting, reduction):
        w = weights[weighting]
        if reduction == "token":
            return sum(a * b for a, b in zip(w, l_t)) / len(l_t)
        return sum(w[j] * l_t[j] / lengths[seq[j]] for j in range(len(l_t))) / len(lengths)

    for name, (weighting, reduction) in {"opsd": ("uniform", "token"), "opsd-seq": ("uniform", "sequence"),
                                         "pwopsd": ("position", "sequence"), "pwopsd-tok": ("position", "token"),
                                         "pwopsd-linear": ("linear", "sequence")}.items():
        assert metrics[name][0]["loss"] == pytest.approx(expected(weighting, reduction), rel=1e-5), name
    assert metrics["pwopsd-tok"][0]["loss"] != pytest.approx(metrics["pwopsd"][0]["loss"], rel=1e-3)
    assert metrics["opsd-seq"][0]["loss"] != pytest.approx(metrics["opsd"][0]["loss"], rel=1e-3)
    # pwopsd-linear: the ramp averages w_min + (1 - w_min) / 2 = 0.625 over every sequence
    assert metrics["pwopsd-linear"][0]["weight_mean"] == pytest.approx(0.625, rel=1e-6)
    assert metrics["pwopsd-linear"][0]["weight_min"] == pytest.approx(0.25 + 0.75 * 0.5 / 9, rel=1e-6)

    # Two micro-batches (3 + 6 and 9 + 3 tokens) give the step-1 loss of one micro-batch: global normalisers.
    for name in ("eopd", "sampled_rkl", "reopold", "reopold-ent"):
        assert metrics[name][0]["loss"] == pytest.approx(metrics[name + "/1mb"][0]["loss"], rel=1e-4, abs=1e-7), name
    # Diagnostics are logged, and REOPOLD's phases switch at --reopold_switch_step.
    assert {"high_entropy_frac", "clip_frac", "topk_kl"} <= set(metrics["eopd"][0]) and metrics["eopd"][0]["clip_frac"] == 0
    assert "rkl_k1" in metrics["sampled_rkl"][0]
    assert "entropy_threshold" not in metrics["reopold"][0] and "entropy_threshold" in metrics["reopold"][1]
    assert metrics["reopold-ent"][0]["mask_frac"] == pytest.approx(math.ceil(0.2 * 21) / 21)
