"""Clipped forward KL, position weights and reductions, and the chunked path."""
import math

import pytest
import torch

import loss as L
from pwopsd import fused


def direct_clipped_fkl(s_logits, t_logits, T, c):
    """Element by element, straight from the formula, in float64."""
    out = []
    for zs, zt in zip(s_logits.double().tolist(), t_logits.double().tolist()):
        ls = [z / T for z in zs]
        lt = [z / T for z in zt]
        ms, mt = max(ls), max(lt)
        lse_s = ms + math.log(sum(math.exp(z - ms) for z in ls))
        lse_t = mt + math.log(sum(math.exp(z - mt) for z in lt))
        total = 0.0
        for a, b in zip(ls, lt):
            p_t = math.exp(b - lse_t)
            total += min(p_t * ((b - lse_t) - (a - lse_s)), c) if c > 0 else p_t * ((b - lse_t) - (a - lse_s))
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("clip", [0.05, 0.0])
def test_clipped_forward_kl_matches_direct_formula(clip):
    torch.manual_seed(0)
    s, t = torch.randn(7, 11) * 3, torch.randn(7, 11) * 3
    got = L.clipped_forward_kl(s, t, temperature=1.1, clip=clip)
    assert got.dtype == torch.float32 and got.shape == (7,)
    torch.testing.assert_close(got.double(), direct_clipped_fkl(s, t, 1.1, clip), rtol=1e-5, atol=1e-6)


def test_clipped_entries_carry_no_gradient():
    torch.manual_seed(1)
    s, t = (torch.randn(5, 9) * 3).requires_grad_(), torch.randn(5, 9) * 3
    T, c = 1.1, 0.05
    log_p_s, log_p_t = torch.log_softmax(s / T, -1), torch.log_softmax(t / T, -1)
    pointwise = (log_p_t.exp() * (log_p_t - log_p_s)).detach()
    clipped = pointwise > c
    assert 0 < clipped.sum() < clipped.numel(), "the example must mix clipped and unclipped entries"
    (g,) = torch.autograd.grad(L.clipped_forward_kl(s, t, T, c).sum(), s)
    # Expected: d/ds of sum over *unclipped* entries only; clipped entries are the constant c.
    s2 = s.detach().clone().requires_grad_()
    lp = torch.log_softmax(s2 / T, -1)
    manual = (log_p_t.exp() * (log_p_t - lp))[~clipped].sum()
    (g2,) = torch.autograd.grad(manual, s2)
    torch.testing.assert_close(g, g2)
    # And the teacher gets no gradient at all.
    t_req = t.clone().requires_grad_()
    assert not L.clipped_forward_kl(s.detach(), t_req, T, c).requires_grad


@pytest.mark.parametrize("frac,expected", [(0.0, 0.286), (0.3, 0.625), (0.5, 0.911), (0.8, 0.995)])
def test_position_schedule_paper_values(frac, expected):
    assert abs(L.position_schedule(torch.tensor(frac)).item() - expected) <= 0.002


def test_position_weights_use_each_sequences_own_length():
    lengths = torch.tensor([2, 4])
    frac = L.relative_positions(lengths)
    torch.testing.assert_close(frac, torch.tensor([0.25, 0.75, 0.125, 0.375, 0.625, 0.875]))
    torch.testing.assert_close(L.position_weights(lengths), L.position_schedule(frac))
    torch.testing.assert_close(L.uniform_weights(lengths), torch.ones(6))


def test_reductions_on_hand_built_batch():
    lengths = torch.tensor([1, 3])
    l = torch.tensor([2.0, 1.0, 2.0, 3.0])
    w = torch.tensor([1.0, 0.5, 1.0, 1.0])
    tok = (L.token_coefficients(lengths, w, "token", total_tokens=4, total_sequences=2) * l).sum()
    assert tok.item() == pytest.approx((2 + 0.5 + 2 + 3) / 4)
    seq = (L.token_coefficients(lengths, w, "sequence", total_tokens=4, total_sequences=2) * l).sum()
    assert seq.item() == pytest.approx((2 / 1 + (0.5 + 2 + 3) / 3) / 2)
    with pytest.raises(ValueError, match="--reduction"):
        L.token_coefficients(lengths, w, "mean", 4, 2)


@pytest.mark.parametrize("reduction", ["token", "sequence"])
def test_micro_batches_sum_to_the_full_batch(reduction):
    """1 micro-batch of 4 == 2 micro-batches of 2, with the step's global normaliser (loss and gradient)."""
    torch.manual_seed(2)
    lengths = torch.tensor([3, 1, 4, 2])
    N, V = int(lengths.sum()), 13
    s = (torch.randn(N, V) * 2).requires_grad_()
    t = torch.randn(N, V) * 2

    def part(lo, hi):
        ln = lengths[lo:hi]
        a, b = int(lengths[:lo].sum()), int(lengths[:hi].sum())
        coef = L.token_coefficients(ln, L.position_weights(ln), reduction, float(N), 4.0)
        return (coef * L.clipped_forward_kl(s[a:b], t[a:b])).sum()

    full = part(0, 4)
    (g_full,) = torch.autograd.grad(full, s)
    split = part(0, 2) + part(2, 4)
    (g_split,) = torch.autograd.grad(split, s)
    torch.testing.assert_close(full, split)
    torch.testing.assert_close(g_full, g_split)


# ---- chunked path == reference --------- ---------------------------------------------------------------
def _reference(h_s, h_t, W_s, W_t, coef, T, c):
    return (coef * L.clipped_forward_kl(h_s @ W_s.T, h_t @ W_t.T, T, c)).sum()


@pytest.mark.parametrize("weighting", ["uniform", "position"])
@pytest.mark.parametrize("reduction", ["token", "sequence"])
@pytest.mark.parametrize("chunk", [4, 7, 64])  # divides N=28, does not, larger than N
@pytest.mark.parametrize("head_trainable", [False, True])
def test_chunked_equals_reference(weighting, reduction, chunk, head_trainable):
    torch.manual_seed(3)
    lengths = torch.tensor([5, 9, 14])
    N, H, V = int(lengths.sum()), 16, 97
    h_s = torch.randn(N, H, requires_grad=True)
    h_t = torch.randn(N, H)
    W = (torch.randn(V, H) * 0.7).requires_grad_(head_trainable)
    W_t = W.detach() if not head_trainable else torch.randn(V, H) * 0.7
    coef = L.token_coefficients(lengths, L.WEIGHTINGS[weighting](lengths), reduction, float(N), 3.0)
    T, c = 1.1, 0.05
    # the example must contain clipped entries
    lp_s, lp_t = torch.log_softmax(h_s @ W.T / T, -1), torch.log_softmax(h_t @ W_t.T / T, -1)
    assert ((lp_t.exp() * (lp_t - lp_s)) > c).any()

    ref = _reference(h_s, h_t, W, W_t, coef, T, c)
    inputs = [h_s, W] if head_trainable else [h_s]
    g_ref = torch.autograd.grad(ref, inputs)
    got, per_token = fused.chunked_clipped_fkl(h_s, h_t, W, W_t, coef, T, c, chunk_size=chunk)
    g_got = torch.autograd.grad(got, inputs)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(per_token, L.clipped_forward_kl(h_s @ W.T, h_t @ W_t.T, T, c).detach(), rtol=1e-5, atol=1e-7)
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_chunked_bf16_close_to_fp32_reference():
    """bf16 hidden states / head: the documented tolerance is 2e-2 relative on the loss."""
    torch.manual_seed(4)
    N, H, V = 40, 32, 211
    h_s, h_t, W = torch.randn(N, H), torch.randn(N, H), torch.randn(V, H) * 0.5
    coef = torch.full((N,), 1.0 / N)
    ref = _reference(h_s, h_t, W, W, coef, 1.1, 0.05)
    got, _ = fused.chunked_clipped_fkl(h_s.bfloat16(), h_t.bfloat16(), W.bfloat16(), W.bfloat16(), coef, 1.1, 0.05, 16)
    assert abs(got.item() - ref.item()) <= 2e-2 * abs(ref.item())


def test_chunked_rejects_bad_chunk_size():
    with pytest.raises(ValueError, match="--loss_chunk_size"):
        fused.chunked_clipped_fkl(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(5, 3), torch.zeros(5, 3), torch.ones(2), chunk_size=0)


# ---- the registry: the default path of step_loss is the fused clipped forward KL -------------------------
def test_step_loss_default_path_is_the_registered_fast_path():
    """step_loss("clipped_fkl", "chunked") with the point-wise clip calls FAST_PATHS' entry directly (one call below
    step_loss): same value bit for bit, and equal to the readable clipped_forward_kl within float32 rounding."""
    from types import SimpleNamespace
    assert L.FAST_PATHS[("clipped_fkl", "chunked")] is fused.chunked_clipped_fkl
    torch.manual_seed(5)
    lengths = torch.tensor([4, 7])
    N, H, V = 11, 8, 41
    h_s, h_t, W = torch.randn(N, H, requires_grad=True), torch.randn(N, H), torch.randn(V, H)
    coef = L.token_coefficients(lengths, L.position_weights(lengths), "sequence", float(N), 2.0)
    ctx = L.LossContext(tokens=torch.zeros(N, dtype=torch.long), lengths=lengths, coef=coef, total_tokens=float(N),
                        total_sequences=2.0, step=0)
    args = SimpleNamespace(temperature=1.1, clip=0.05, loss_chunk_size=3, beta=0.0, teacher_top_k=0, clip_mode="pointwise")
    got, stats = L.step_loss("clipped_fkl", "chunked", h_s, h_t, W, W, ctx, args)
    fast, _ = fused.chunked_clipped_fkl(h_s, h_t, W, W, coef, 1.1, 0.05, 3)
    assert stats == {} and torch.equal(got, fast)
    torch.testing.assert_close(got, _reference(h_s, h_t, W, W, coef, 1.1, 0.05), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", ["total", "scaled"])
def test_step_loss_sends_other_clip_modes_through_the_reference_code(mode):
    """The fused gradient is the point-wise clip's: --clip_mode total / scaled under --loss_impl chunked must give
    the reference path's value and gradient (checkpointed chunks of clipped_forward_kl), not the fused one's."""
    from types import SimpleNamespace
    torch.manual_seed(6)
    lengths = torch.tensor([5, 6])
    N, H, V = 11, 8, 41
    h_t, W = torch.randn(N, H) * 3, torch.randn(V, H)
    coef = L.token_coefficients(lengths, L.uniform_weights(lengths), "token", float(N), 2.0)
    ctx = L.LossContext(tokens=torch.zeros(N, dtype=torch.long), lengths=lengths, coef=coef, total_tokens=float(N),
                        total_sequences=2.0, step=0)
    args = SimpleNamespace(temperature=1.1, clip=0.05, loss_chunk_size=4, beta=0.0, teacher_top_k=0, clip_mode=mode)
    out = {}
    for impl in ("reference", "chunked"):
        h_s = (torch.randn(N, H, generator=torch.Generator().manual_seed(7)) * 3).requires_grad_()
        loss, _ = L.step_loss("clipped_fkl", impl, h_s, h_t, W, W, ctx, args)
        out[impl] = (loss, torch.autograd.grad(loss, h_s)[0])
    h_s = h_s.detach().requires_grad_()
    g_pointwise = torch.autograd.grad(fused.chunked_clipped_fkl(h_s, h_t, W, W, coef, 1.1, 0.05, 4)[0], h_s)[0]
    assert (out["reference"][1] - g_pointwise).abs().max() > 1e-4  # the modes' gradients differ here...
    torch.testing.assert_close(out["chunked"][0], out["reference"][0], rtol=1e-6, atol=1e-7)  # ...and chunked follows
    torch.testing.assert_close(out["chunked"][1], out["reference"][1], rtol=1e-5, atol=1e-7)


def test_fused_module_imports_no_stage_file():
    """pwopsd/ is the support package: it never imports a top-level stage file (no import cycles)."""
    import ast
    import pathlib
    stages = {"data", "rollout", "teacher", "loss", "train", "evaluate", "diagnose"}
    tree = ast.parse((pathlib.Path(__file__).parents[1] / "pwopsd" / "fused.py").read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & stages, imported & stages
