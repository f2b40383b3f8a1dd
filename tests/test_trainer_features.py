"""Generalized JSD (--beta), top-k teacher with a tail bucket (--teacher_top_k), IW-OPD weights (--method iwopd),
and several rollouts per prompt (--num_generations).

Loss values are checked against float64 formulas written element by element here; --num_generations against
the same step with each prompt duplicated and the same fixed completions (no sampling).
"""
import math
from types import SimpleNamespace

import pytest
import torch

import loss as L
import train

T, C = 1.1, 0.05


def log_softmax64(z):
    z = [v / T for v in z]
    m = max(z)
    lse = m + math.log(sum(math.exp(v - m) for v in z))
    return [v - lse for v in z]


def logits(seed, n=6, v=9, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g) * scale


# ---- generalized JSD --------------------------------------------------------------------------------
def jsd64(s, t, beta, clip):
    """Per token, per vocabulary entry, from the definition (beta 0 = forward KL, 1 = reverse KL)."""
    out = []
    for zs, zt in zip(s.double().tolist(), t.double().tolist()):
        ls, lt = log_softmax64(zs), log_softmax64(zt)
        total = 0.0
        for a, b in zip(ls, lt):
            ps, pt = math.exp(a), math.exp(b)
            if beta == 0:
                e = pt * (b - a)
            elif beta == 1:
                e = ps * (a - b)
            else:
                m = beta * pt + (1 - beta) * ps
                e = beta * pt * (b - math.log(m)) + (1 - beta) * ps * (a - math.log(m))
            total += min(e, clip) if clip > 0 else e
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("clip", [C, 0.0])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 0.2])
def test_jsd_matches_float64_formula(beta, clip):
    s, t = logits(0), logits(1)
    got = L.clipped_generalized_jsd(s, t, T, clip, beta)
    assert got.dtype == torch.float32 and got.shape == (6,)
    torch.testing.assert_close(got.double(), jsd64(s, t, beta, clip), rtol=1e-5, atol=1e-6)
    if clip == 0:
        assert (got > 0).all()  # a divergence of distinct distributions


def test_jsd_ends_and_clip_are_per_vocabulary_entry():
    s, t = logits(2), logits(3)
    fkl = L.clipped_generalized_jsd(s, t, T, 0.0, 0.0)
    rkl = L.clipped_generalized_jsd(s, t, T, 0.0, 1.0)
    assert not torch.allclose(fkl, rkl, rtol=1e-2)  # the two ends really are different directions
    torch.testing.assert_close(rkl, L.clipped_generalized_jsd(t, s, T, 0.0, 0.0))  # KL(S||T) = forward KL with roles swapped
    # Per-entry clip: some token's clipped value lies strictly between min(l_t, c) and l_t -- a per-token clip
    # could not produce that.
    full, clipped = L.clipped_generalized_jsd(s, t, T, 0.0, 0.5), L.clipped_generalized_jsd(s, t, T, C, 0.5)
    assert ((clipped > C + 1e-6) & (clipped < full - 1e-6)).any()


def test_jsd_beta0_is_todays_loss_exactly_reference_and_chunked():
    torch.manual_seed(0)
    N, H, V = 7, 8, 11
    h_s, h_t, W = torch.randn(N, H), torch.randn(N, H), torch.randn(V, H)
    s, t = h_s @ W.T, h_t @ W.T
    assert torch.equal(L.clipped_generalized_jsd(s, t, T, C, 0.0), L.clipped_forward_kl(s, t, T, C))
    coef = torch.rand(N)
    ctx = SimpleNamespace(coef=coef)
    hp = SimpleNamespace(temperature=T, clip=C, beta=0.0, teacher_top_k=0, loss_chunk_size=3)
    ref, _ = L.step_loss("clipped_fkl", "reference", h_s, h_t, W, W, ctx, hp)
    chunked, _ = L.step_loss("clipped_fkl", "chunked", h_s, h_t, W, W, ctx, hp)
    assert torch.equal(ref, (coef * L.clipped_forward_kl(s, t, T, C)).sum())
    torch.testing.assert_close(chunked, ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("beta,k", [(0.5, 0), (1.0, 0), (0.0, 3)])
def test_chunked_jsd_and_topk_equal_reference_value_and_gradient(beta, k):
    torch.manual_seed(1)
    N, H, V = 7, 8, 11
    h_t, W = torch.randn(N, H), torch.randn(V, H)
    ctx = SimpleNamespace(coef=torch.rand(N))
    hp = SimpleNamespace(temperature=T, clip=C, beta=beta, teacher_top_k=k, loss_chunk_size=3)
    out = {}
    for impl in ("reference", "chunked"):
        h_s = torch.randn(N, H, generator=torch.Generator().manual_seed(2)).requires_grad_()
        loss, _ = L.step_loss("clipped_fkl", impl, h_s, h_t, W, W, ctx, hp)
        loss.backward()
        out[impl] = (loss.detach(), h_s.grad)
    torch.testing.assert_close(out["chunked"][0], out["reference"][0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out["chunked"][1], out["reference"][1], rtol=1e-5, atol=1e-7)
    assert out["reference"][1].abs().max() > 1e-4


def test_jsd_gradient_matches_float64_autograd():
    s, t = logits(4), logits(5)
    coef = torch.linspace(0.1, 0.6, 6)
    s32 = s.clone().requires_grad_()
    (coef * L.clipped_generalized_jsd(s32, t, T, C, 0.5)).sum().backward()
    s64 = s.double().requires_grad_()
    ls, lt = torch.log_softmax(s64 / T, -1), torch.log_softmax(t.double() / T, -1)
    m = 0.5 * lt.exp() + 0.5 * ls.exp()
    e = 0.5 * lt.exp() * (lt - m.log()) + 0.5 * ls.exp() * (ls - m.log())
    (coef.double() * e.clamp(max=C).sum(-1)).sum().backward()
    torch.testing.assert_close(s32.grad.double(), s64.grad, rtol=1e-4, atol=1e-7)
    assert s32.grad.abs().max() > 1e-3


# ---- top-k teacher + tail bucket -------------------------------------------------------------------
def topk64(s, t, k, clip):
    out = []
    for zs, zt in zip(s.double().tolist(), t.double().tolist()):
        ls, lt = log_softmax64(zs), log_softmax64(zt)
        top = sorted(range(len(lt)), key=lambda v: -lt[v])[:k]
        pt = [math.exp(lt[v]) for v in top] + [sum(math.exp(lt[v]) for v in range(len(lt)) if v not in top)]
        ps = [math.exp(ls[v]) for v in top] + [sum(math.exp(ls[v]) for v in range(len(ls)) if v not in top)]
        total = 0.0
        for a, b in zip(ps, pt):
            e = b * (math.log(b) - math.log(a)) if b > 0 else 0.0
            total += min(e, clip) if clip > 0 else e
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("clip", [C, 0.0])
@pytest.mark.parametrize("k", [1, 3, 8])
def test_topk_tail_matches_float64_formula(k, clip):
    s, t = logits(6), logits(7)
    got = L.clipped_topk_forward_kl(s, t, T, clip, k)
    torch.testing.assert_close(got.double(), topk64(s, t, k, clip), rtol=1e-5, atol=1e-6)
    if clip == 0:  # a proper divergence over k + 1 outcomes: below the full KL (data processing), above 0
        full = L.clipped_forward_kl(s, t, T, 0.0)
        assert (got > 0).all() and (got <= full + 1e-6).all()


@pytest.mark.parametrize("clip", [C, 0.0])
@pytest.mark.parametrize("k", [9, 20])
def test_topk_at_least_vocabulary_is_the_full_kl(k, clip):
    s, t = logits(8), logits(9)
    sg = s.clone().requires_grad_()
    got = L.clipped_topk_forward_kl(sg, t, T, clip, k)
    torch.testing.assert_close(got, L.clipped_forward_kl(s, t, T, clip), rtol=1e-6, atol=1e-7)
    got.sum().backward()
    assert torch.isfinite(sg.grad).all()  # the empty tail carries no inf - inf into the gradient


def test_topk_loss_dispatch_and_flag_checks():
    s, t = logits(10), logits(11)
    ctx = SimpleNamespace(coef=torch.full((6,), 0.5))
    hp = SimpleNamespace(temperature=T, clip=C, beta=0.0, teacher_top_k=3)
    got, _ = L.clipped_fkl_loss(s, t, ctx, hp)
    torch.testing.assert_close(got, 0.5 * L.clipped_topk_forward_kl(s, t, T, C, 3).sum())


@pytest.mark.parametrize("extra,message", [
    (["--beta", "1.5"], "--beta must be in [0, 1] (got 1.5)"),
    (["--teacher_top_k", "-1"], "--teacher_top_k must be >= 0"),
    (["--beta", "0.5", "--teacher_top_k", "4"], "--teacher_top_k is a forward KL: use it with --beta 0"),
    (["--method", "eopd", "--beta", "0.5"], "--method eopd does not use it"),
    (["--num_generations", "0"], "--num_generations must be > 0"),
    (["--iwopd_gamma", "-1"], "--iwopd_gamma must be >= 0"),
])
def test_bad_flags_fail_in_one_line(extra, message):
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--model", "x", *extra])
    assert message in str(e.value)


def test_defaults_keep_the_paper():
    a = train.Args()
    assert (a.beta, a.teacher_top_k, a.num_generations, a.iwopd_gamma) == (0.0, 0, 1, 0.5)


# ---- IW-OPD -----------------------------------------------------------------------------------------
def test_iwopd_weights_values():
    # sequence 0: |a| = 1, 2, 1 (S = 4, prefix 0, 1, 3); sequence 1: all zero -> S = eps, weights 1 + gamma
    w = L.iwopd_weights(torch.tensor([3, 2]), torch.tensor([1.0, -2.0, 1.0, 0.0, 0.0]), gamma=0.5)
    torch.testing.assert_close(w, torch.tensor([1.5, 1.375, 1.125, 1.5, 1.5]))
    w = L.iwopd_weights(torch.tensor([2, 3]), torch.tensor([0.5, 0.5, -3.0, 1.0, 2.0]), gamma=1.0)
    torch.testing.assert_close(w, torch.tensor([2.0, 1.5, 2.0, 1.5, 1 + 2 / 6]))
    assert L.METHODS["iwopd"] == ("iwopd", "uniform", "token")


def test_iwopd_loss_value_and_gradient():
    s, t = logits(12), logits(13)
    y = [0, 3, 5, 1, 8, 2]
    lengths, coef = torch.tensor([4, 2]), torch.linspace(0.05, 0.3, 6)
    sg = s.clone().requires_grad_()
    ctx = SimpleNamespace(tokens=torch.tensor(y), lengths=lengths, coef=coef)
    loss, stats = L.iwopd_loss(sg, t, ctx, SimpleNamespace(temperature=T, iwopd_gamma=0.5))
    loss.backward()
    LS, LT = [log_softmax64(z) for z in s.double().tolist()], [log_softmax64(z) for z in t.double().tolist()]
    A = [LT[i][y[i]] - LS[i][y[i]] for i in range(6)]
    w = []
    for lo, hi in ((0, 4), (4, 6)):
        tot = sum(abs(a) for a in A[lo:hi])
        w += [1 + 0.5 * (1 - sum(abs(a) for a in A[lo:j]) / tot) for j in range(lo, hi)]
    expected = -sum(coef[i].item() * w[i] * A[i] * LS[i][y[i]] for i in range(6))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # d/dz_S(v) of -c w A log p_S(y) = -c w A (1[v = y] - p_S(v)) / T   (A and w are stop-gradient)
    grad = torch.tensor([[-coef[i].item() * w[i] * A[i] * ((v == y[i]) - math.exp(LS[i][v])) / T for v in range(9)]
                         for i in range(6)])
    torch.testing.assert_close(sg.grad.double(), grad.double(), rtol=1e-4, atol=1e-7)
    assert stats["iw_weight_mean"] == pytest.approx(sum(w) / 6, rel=1e-6) and w[0] == w[4] == 1.5


# ---- several rollouts per prompt ------------------------------------------------------------------
@pytest.fixture(scope="module")
def gen_run(tmp_path_factory, peaked_model_dir):
    """A --num_generations 2 run on a peaked tiny model (O(1) KL, so a misaligned prompt shows) and 4 problems."""
    import json

    tmp = tmp_path_factory.mktemp("gens")
    data = tmp / "d.jsonl"
    data.write_text("\n".join(json.dumps({"problem": f"What is {i} + {3 * i}?", "solution": f"{i} + {3 * i} = {4 * i}",
                                          "answer": str(4 * i)}) for i in range(1, 5)))
    args = train.parse_args(["--model", peaked_model_dir, "--dataset", str(data), "--batch_size", "2",
                             "--num_generations", "2", "--per_device_train_batch_size", "2", "--rollout_backend", "hf",
                             "--lora_r", "4", "--lora_alpha", "8", "--max_new_tokens", "5", "--output_dir", str(tmp / "o"),
                             "--seed", "3"])
    return train.setup(args)


def test_generations_accounting_and_sampling(gen_run):
    run = gen_run
    assert run.grad_accum == 2  # 2 prompts x 2 rollouts / (2 per micro-batch x 1 process)
    batch, _ = train.step_batch(run, 0)
    assert len(batch) == 2
    rollouts = train.sample_rollouts(run, batch, 0)
    assert [r.prompt_ids for r in rollouts] == [batch[0]["student_ids"]] * 2 + [batch[1]["student_ids"]] * 2
    assert rollouts[0].completion_ids != rollouts[1].completion_ids  # two samples, not one copied


def grads_of(run):
    return {n: p.grad.detach().clone() for n, p in run.accelerator.unwrap_model(run.model).named_parameters()
            if p.requires_grad}


@pytest.mark.parametrize("reduction", ["token", "sequence"])
def test_two_generations_equal_duplicated_prompts(gen_run, reduction):
    from rollout import Rollout

    run = gen_run
    run.reduction = reduction
    batch, _ = train.step_batch(run, 0)
    comps = [[101, 102, 103, 104, 105, 2], [201, 202], [301, 302, 303, 304, 305, 306, 307, 2], [401, 402, 403]]
    prompts = [batch[0], batch[0], batch[1], batch[1]]
    rollouts = [Rollout(p["student_ids"], c, truncated=False) for p, c in zip(prompts, comps)]

    def step(b):
        run.optimizer.zero_grad()
        out = train.accumulate_gradients(run, b, rollouts, step=0)
        return out, grads_of(run)

    g2, grads2 = step(batch)      # G = 2: 2 prompts, 4 rollouts
    g1, grads1 = step(prompts)    # G = 1: each prompt duplicated
    assert g2["total_sequences"] == g1["total_sequences"] == 4 and g2["total_tokens"] == 19
    assert g1["loss"] > 0.05
    assert g2["loss"] == pytest.approx(g1["loss"], rel=1e-6)
    scale = max(g.abs().max().item() for g in grads1.values())
    assert scale > 0
    for n in grads1:
        torch.testing.assert_close(grads2[n], grads1[n], rtol=1e-6, atol=1e-6 * scale, msg=n)
    # The test can fail: rollouts paired with the wrong prompts give another loss.
    wrong, _ = step([batch[0], batch[1], batch[0], batch[1]])
    assert wrong["loss"] != pytest.approx(g1["loss"], rel=1e-3)
    run.optimizer.zero_grad()
