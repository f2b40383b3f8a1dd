"""Losses: the point-wise clipped forward KL, token weights, reductions, and the method table.

Layout. A batch's completion tokens are *packed*: sequence 0's tokens, then sequence 1's, ... -- N tokens
in all, ``lengths[i]`` of them for sequence i. Per-token tensors are ``[N]``, logits ``[N, V]``,
hidden states ``[N, H]``.

Per-token loss (OPSD, arXiv:2601.18734, Eq. 4; PW-OPSD, arXiv:2605.21606, Eq. 2), with both logits
divided by the temperature T and the clip c applied to each vocabulary entry before the sum:

    l_t = sum_v min( p_T(v) * (log p_T(v) - log p_S(v)), c )

Gradient flows only through the student; clipped entries carry none.

Token weights (PW-OPSD Eq. 3): ``uniform`` (OPSD) or ``position``:

    w_t = w_min + (1 - w_min) * sigmoid((frac_t - tau) / s),   frac_t = (t - 0.5) / L_i,  t = 1..L_i

Reductions: ``token`` -- sum_t w_t l_t / (completion tokens in the optimizer step), the OPSD global
token mean; ``sequence`` -- mean over sequences of (sum_t w_t l_t / L_i), PW-OPSD's per-sequence mean.
Both are written as ``loss = sum_t coef_t * l_t`` with ``coef_t`` from ``token_coefficients`` and the
*global* normaliser (all micro-batches, all processes) -- which is what makes gradient accumulation and
data parallelism give the same gradient as one big batch.

Two implementations of the clipped forward KL: ``clipped_forward_kl`` on logits (readable; the spec and
the test oracle) and ``chunked_clipped_fkl`` on hidden states, which never materialises more than a
``[chunk, V]`` slice (see its docstring).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F


# ==================================================================================================
# ALGORITHM: the method table -- which per-token loss, token weighting and reduction ``--method`` selects
# ==================================================================================================
class Method(NamedTuple):
    loss: str       # key of LOSSES: the per-token loss
    weighting: str  # key of WEIGHTINGS: default token weights (--weighting overrides)
    reduction: str  # "token" (global token mean) | "sequence" (per-sequence mean); --reduction overrides


METHODS = {
    "opsd": Method("clipped_fkl", "uniform", "token"),             # OPSD (arXiv:2601.18734)
    "pwopsd": Method("clipped_fkl", "position", "sequence"),       # PW-OPSD (arXiv:2605.21606)
    "pwopsd-linear": Method("clipped_fkl", "linear", "sequence"),  # README example: a new weighting
    "eopd": Method("eopd", "uniform", "token"),                    # EOPD baseline (arXiv:2603.07079)
    "reopold": Method("reopold", "uniform", "token"),              # REOPOLD baseline (arXiv:2603.11137); own sum(M) normaliser
    "sampled_rkl": Method("sampled_rkl", "uniform", "token"),      # sampled-token reverse KL (policy gradient)
    "iwopd": Method("iwopd", "uniform", "token"),                  # IW-OPD baseline (arXiv:2606.22600); weights inside the loss
    "sft": Method("sft", "uniform", "token"),                      # SFT on the reference solutions (OPSD's baseline; warm start)
}
REDUCTIONS = ("token", "sequence")


@dataclass
class LossContext:
    """What a per-step loss knows about its micro-batch besides the logits (packed layout, see above)."""
    tokens: torch.Tensor            # [N] long: the sampled completion token ids y_t
    lengths: torch.Tensor           # [B] long: completion length of each sequence
    coef: torch.Tensor              # [N] float: weight x reduction factor with the step's global normaliser
    total_tokens: float             # completion tokens of the whole optimizer step, all processes
    total_sequences: float          # sequences of the whole optimizer step, all processes
    step: int                       # optimizer step, 0-based
    token_stats: torch.Tensor | None = None       # losses in TOKEN_STATS: [N, k] this micro-batch's statistics
    step_token_stats: torch.Tensor | None = None  # ... and [N_step, k] the whole step's, all processes


# ==================================================================================================
# ALGORITHM: the clipped forward KL on full logits (the reference)
# ==================================================================================================
def clipped_forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.1,
                       clip: float = 0.05, clip_mode: str = "pointwise") -> torch.Tensor:
    """Point-wise clipped forward KL per token (OPSD Eq. 4), or a non-inverting variant (``clip_kl_terms``).

    Args:
        student_logits: ``[N, V]``, any float dtype (computed in float32); carries the gradient.
        teacher_logits: ``[N, V]``; detached here (the teacher gets no gradient).
        temperature: both logits are divided by it (paper: 1.1).
        clip: c; each vocabulary entry ``p_T (log p_T - log p_S)`` is capped at c before the sum.
            ``clip <= 0`` disables clipping (plain forward KL).
        clip_mode: ``pointwise`` (the paper), ``total`` or ``scaled``; see ``clip_kl_terms``.
    Returns:
        ``[N]`` float32, nats.
    Raises:
        ValueError: unknown ``clip_mode``.
    """
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    return clip_kl_terms(log_p_t.exp() * (log_p_t - log_p_s), clip, clip_mode)


CLIP_MODES = ("pointwise", "total", "scaled")


def clip_kl_terms(pointwise: torch.Tensor, clip: float, mode: str = "pointwise") -> torch.Tensor:
    """Per-token loss ``[N]`` from the forward-KL entries ``x_v = p_T(v) (log p_T(v) - log p_S(v))`` ``[N, V]``.

    ``pointwise`` (OPSD Eq. 4, the default): ``sum_v min(x_v, c)``; a clipped entry is constant, so its
    gradient is 0. The gradient w.r.t. the student logit z_u is then ``(p_S(u) M - m_u p_T(u)) / T`` with
    ``M = sum of p_T over unclipped entries``: for a clipped teacher top-1 token (m_u = 0) it is
    ``p_S(u) M / T > 0``, so a descent step *lowers* the student's probability of the token the teacher
    prefers most. Two variants that keep the same loss scale but never push that way:
      * ``total``: value ``min(KL_t, c)`` with ``KL_t = sum_v x_v``, gradient ``min(1, c / KL_t)`` times the
        full forward KL's -- the gradient of a token whose KL exceeds c is scaled down, not redirected, so
        it always points from p_S towards p_T;
      * ``scaled``: value ``sum_v min(x_v, c)`` as ``pointwise``, but a clipped entry keeps its gradient
        times ``c / x_v`` instead of 0 (the student is pulled towards the reweighted target
        ``q ∝ s_v p_T(v)``, ``s_v = min(1, c / x_v)``; a clipped top-1 is still pulled up unless
        ``q(top-1) < p_S(top-1)``, which can happen when the rest of the teacher's mass is unclipped).
    ``clip <= 0`` -> plain forward KL in every mode. Float32 in, float32 out (nats).
    Raises ValueError on an unknown mode.
    """
    if mode not in CLIP_MODES:
        raise ValueError(f"--clip_mode: unknown {mode!r} ({'|'.join(CLIP_MODES)})")
    if clip <= 0:
        return pointwise.sum(-1)
    if mode == "pointwise":
        return pointwise.clamp(max=clip).sum(-1)  # clamp's gradient is 0 where the entry is clipped
    if mode == "scaled":
        scale = torch.where(pointwise > clip, clip / pointwise.detach().clamp(min=clip), torch.ones_like(pointwise))
        return (pointwise * scale.detach()).sum(-1)  # = min(x_v, c) in value
    total = pointwise.sum(-1)
    return total * (clip / total.detach().clamp(min=clip))  # = min(KL_t, c) in value


def clipped_generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.1,
                            clip: float = 0.05, beta: float = 0.0) -> torch.Tensor:
    """Point-wise clipped generalized Jensen-Shannon divergence per token (``--beta``; GKD, Agarwal et al. 2024,
    Eq. 1, in the convention of the official OPSD code and TRL's ``generalized_jsd_loss``):

        m    = beta p_T + (1 - beta) p_S                      (the mixture; weight beta on the teacher)
        e(v) = beta p_T(v) log(p_T(v) / m(v)) + (1 - beta) p_S(v) log(p_S(v) / m(v))
        l_t  = sum_v min(e(v), c)

    beta = 0 is defined as the forward KL, e(v) = p_T (log p_T - log p_S), i.e. exactly ``clipped_forward_kl``
    (the OPSD / PW-OPSD loss; this function calls it); beta = 1 is the reverse KL, e(v) = p_S (log p_S - log p_T).
    Both ends are special cases, as in the official code and TRL: the mixture formula itself tends to 0 at either
    end (m -> the only side left), so neither end is its limit.

    Where the clip acts. The official OPSD code computes ``F.kl_div(..., reduction="none")``, i.e. the ``[B, T, V]``
    tensor of per-vocabulary-entry terms e(v), already combined as beta * (teacher part) + (1 - beta) * (student
    part), and clamps *that* tensor at c before masking and summing over tokens and vocabulary -- so its
    "per-token clip" is in fact per (token, vocabulary entry), which at beta = 0 is OPSD Eq. 4's point-wise clip.
    We do the same: the clamp is applied to the ``[N, V]`` tensor e(v) (both parts together, not to each part),
    then summed over v. Entries above c are constant and carry no gradient; entries may be negative (where
    p_S > p_T in the forward part) and are never clipped from below.

    Args:
        student_logits: ``[N, V]``, any float dtype (computed in float32); carries the gradient (through p_S and m).
        teacher_logits: ``[N, V]``; detached here.
        temperature, clip: as in ``clipped_forward_kl`` (``clip <= 0`` disables clipping).
        beta: in [0, 1].
    Returns:
        ``[N]`` float32, nats.
    Raises:
        ValueError: beta outside [0, 1].
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"--beta must be in [0, 1] (got {beta})")
    if beta == 0.0:
        return clipped_forward_kl(student_logits, teacher_logits, temperature, clip)
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    if beta == 1.0:
        pointwise = log_p_s.exp() * (log_p_s - log_p_t)
    else:
        log_m = torch.logaddexp(log_p_t + math.log(beta), log_p_s + math.log1p(-beta))
        pointwise = beta * log_p_t.exp() * (log_p_t - log_m) + (1 - beta) * log_p_s.exp() * (log_p_s - log_m)
    if clip > 0:
        pointwise = pointwise.clamp(max=clip)
    return pointwise.sum(-1)


def clipped_topk_forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.1,
                            clip: float = 0.05, k: int = 20) -> torch.Tensor:
    """Forward KL over the teacher's top-k tokens plus one tail bucket (``--teacher_top_k``), point-wise clipped:

        K_t = the k tokens of largest p_T at token t;  tail: q(*) = 1 - sum_{v in K_t} q(v), for q = p_T and q = p_S
        l_t = sum_{o in K_t + {tail}} min( p_T(o) (log p_T(o) - log p_S(o)), c )

    Unlike renormalising over K_t (EOPD's top-k, the official OPSD ``top_k_loss``), the tail keeps each side's
    remaining mass, so l_t is a proper divergence between two distributions over k + 1 outcomes: >= 0 without the
    clip, 0 only when the two agree on K_t and on the tail. The clip c acts per outcome, the tail being one outcome
    (the same point-wise clip as the full-vocabulary loss). k >= V gives exactly ``clipped_forward_kl`` (the tail
    is empty). Tail log-masses are computed as a logsumexp over the entries outside K_t -- not as log(1 - sum),
    which cancels catastrophically when the top-k hold almost all the mass.

    Args:
        student_logits / teacher_logits, temperature, clip: as in ``clipped_forward_kl``.
        k: number of teacher tokens kept, >= 1.
    Returns:
        ``[N]`` float32, nats.
    Raises:
        ValueError: k < 1.
    """
    if k < 1:
        raise ValueError(f"--teacher_top_k must be >= 1 here (got {k}; 0 means the full vocabulary)")
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    top_t, idx = log_p_t.topk(min(k, log_p_t.shape[-1]), dim=-1)
    top_s = log_p_s.gather(1, idx)
    outside = torch.ones_like(log_p_t, dtype=torch.bool).scatter_(1, idx, False)
    tail_t = log_p_t.masked_fill(~outside, -math.inf).logsumexp(-1, keepdim=True)
    tail_s = log_p_s.masked_fill(~outside, -math.inf).logsumexp(-1, keepdim=True)
    # An empty tail (k >= V) has mass 0 on both sides: its term is 0 (masked so no inf - inf reaches autograd).
    has_tail = torch.isfinite(tail_t)
    tail_t, tail_s = torch.where(has_tail, tail_t, 0.0), torch.where(has_tail, tail_s, 0.0)
    tail_term = torch.where(has_tail, tail_t.exp() * (tail_t - tail_s), 0.0)
    pointwise = torch.cat([top_t.exp() * (top_t - top_s), tail_term], dim=-1)  # [N, k + 1]
    if clip > 0:
        pointwise = pointwise.clamp(max=clip)
    return pointwise.sum(-1)


# ==================================================================================================
# ALGORITHM: token weights and reductions
# ==================================================================================================
def token_positions(lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``lengths [B]`` (int) -> ``(seq_index [N], t [N])`` with t = 1..L_i within each sequence."""
    seq = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    t = torch.arange(int(lengths.sum()), device=lengths.device) - starts[seq] + 1
    return seq, t


def uniform_weights(lengths: torch.Tensor, **_) -> torch.Tensor:
    """OPSD: every token weighs 1. ``[N]`` float32."""
    return torch.ones(int(lengths.sum()), device=lengths.device)


def relative_positions(lengths: torch.Tensor) -> torch.Tensor:
    """frac_t = (t - 0.5) / L_i for every completion token: the centre of token t in [0, 1]. ``[N]`` float32."""
    seq, t = token_positions(lengths)
    return (t.float() - 0.5) / lengths[seq].float()


def position_schedule(frac: torch.Tensor, w_min: float = 0.25, tau: float = 0.30, s: float = 0.10) -> torch.Tensor:
    """PW-OPSD Eq. 3: ``w_min + (1 - w_min) * sigmoid((frac - tau) / s)``; 0.286 / 0.625 / 0.911 / 0.995 at
    frac 0 / 0.3 / 0.5 / 0.8 with the paper's defaults."""
    return w_min + (1 - w_min) * torch.sigmoid((frac - tau) / s)


def position_weights(lengths: torch.Tensor, w_min: float = 0.25, tau: float = 0.30, s: float = 0.10, **_) -> torch.Tensor:
    """PW-OPSD token weights ``position_schedule(frac_t)``, frac_t = (t - 0.5) / L_i, L_i = that sequence's
    completion length. Not renormalised: early tokens are down-weighted, late ones kept at ~1. ``[N]`` float32."""
    return position_schedule(relative_positions(lengths), w_min, tau, s)


def linear_weights(lengths: torch.Tensor, w_min: float = 0.25, **_) -> torch.Tensor:
    """Example variant (README, "Add your own variant"): a linear ramp from w_min at the first token to 1
    at the last, ``w_min + (1 - w_min) * frac_t``. ``[N]`` float32."""
    return w_min + (1 - w_min) * relative_positions(lengths)


WEIGHTINGS = {"uniform": uniform_weights, "position": position_weights, "linear": linear_weights}


def iwopd_weights(lengths: torch.Tensor, discrepancy: torch.Tensor, gamma: float = 0.5, eps: float = 1e-8) -> torch.Tensor:
    """IW-OPD token weights (Xie et al. 2026, arXiv:2606.22600, Alg. 1; the form of TRL's ``IWOPDTrainer``):

        a_t = |discrepancy_t|,   D_t = sum_{u < t} a_u  (within the sequence),   S = max(sum_u a_u, eps)
        w_t = 1 + gamma * (1 - D_t / S)

    So w = 1 + gamma at the first token and falls towards 1 as the teacher-student discrepancy accumulates along
    the prefix: early tokens keep the most weight, late tokens after high drift the least -- the opposite
    direction to PW-OPSD's schedule. Depends only on each sequence's own tokens (no batch statistics), so
    micro-batching cannot change it. Unlike the ``WEIGHTINGS`` it needs the per-token discrepancy
    (sg(log p_T(y_t) - log p_S(y_t)) in ``iwopd_loss``), which exists only after the forward pass, so the loss
    applies it.

    Args:
        lengths: ``[B]`` completion lengths; discrepancy: ``[N]`` packed per-token values (any sign).
        gamma: amplification (paper / TRL default 0.5); eps: floor of S (an all-zero sequence gets w = 1 + gamma).
    Returns:
        ``[N]`` float32, in [1, 1 + gamma], no gradient.
    """
    a = discrepancy.detach().double().abs()
    seq, _ = token_positions(lengths)
    totals = torch.zeros(len(lengths), dtype=torch.float64, device=a.device).index_add_(0, seq, a)
    before = torch.cumsum(a, 0) - a - (torch.cumsum(totals, 0) - totals)[seq]  # D_t: the sum before t, same sequence
    return (1 + gamma * (1 - before / totals.clamp(min=eps)[seq])).float()


def token_coefficients(lengths: torch.Tensor, weights: torch.Tensor, reduction: str, total_tokens: float,
                       total_sequences: float) -> torch.Tensor:
    """Per-token factors ``coef [N]`` such that the step loss is ``sum_t coef_t * l_t``.

    Args:
        lengths: ``[B]`` completion lengths of this micro-batch.
        weights: ``[N]`` token weights.
        reduction: ``token`` -> ``w_t / total_tokens``; ``sequence`` -> ``w_t / (L_i * total_sequences)``.
        total_tokens / total_sequences: counts over the whole optimizer step (all micro-batches, all
            processes), so summing micro-batch losses gives the loss of the full batch.
    Raises:
        ValueError: unknown reduction.
    """
    if reduction == "token":
        return weights / total_tokens
    if reduction == "sequence":
        seq, _ = token_positions(lengths)
        return weights / (lengths[seq].float() * total_sequences)
    raise ValueError(f"--reduction: unknown {reduction!r} (token|sequence)")


# ==================================================================================================
# PLUMBING (speed, not method): the same clipped forward KL from hidden states, chunk by chunk.
# tests/test_loss.py holds it equal to the reference; try not to modify.
# ==================================================================================================
def _tempered_log_softmax(h: torch.Tensor, w: torch.Tensor, temperature: float, out: torch.Tensor) -> torch.Tensor:
    """``log_softmax(h @ w.T / T)`` written into the float32 buffer ``out`` ``[n, V]`` (no new [n, V] tensor
    for float32 inputs; 1/T is applied to the small ``[n, H]`` side)."""
    h = h / temperature
    if h.dtype == torch.float32 and w.dtype == torch.float32:
        torch.matmul(h, w.T, out=out)
    else:  # bf16 / fp16: the matmul runs in that dtype, the softmax in float32
        out.copy_(h @ w.T)
    return torch.log_softmax(out, dim=-1, out=out)


class _ChunkedClippedFKL(torch.autograd.Function):
    """sum_t coef_t * l_t computed over token chunks; the gradient is formed in the forward pass.

    For the student's tempered log-probs, d l_t / d z_S(v) = (p_S(v) * sum_u m_u p_T(u) - m_v p_T(v)) / T,
    where m_v = 1 for unclipped entries (clipped ones are constant c). So each chunk needs only its own
    ``[chunk, V]`` buffers, and the backward pass merely scales the stored ``[N, H]`` (and ``[V, H]``) grads.
    """

    @staticmethod
    def forward(ctx, h_s, h_t, w_s, w_t, coef, temperature, clip, chunk_size):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        grad_h = torch.zeros_like(h_s) if need_h else None
        grad_w = torch.zeros_like(w_s, dtype=torch.float32) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=h_s.device)
        per_token = torch.empty(h_s.shape[0], dtype=torch.float32, device=h_s.device)
        # Three [chunk, V] float32 buffers (+ a bool mask), allocated once and reused by every chunk: fresh
        # allocations of this size cost page faults on CPU on every chunk.
        n_max, V = min(chunk_size, h_s.shape[0]), w_s.shape[0]
        buf_s, buf_t, buf_p = (torch.empty(n_max, V, dtype=torch.float32, device=h_s.device) for _ in range(3))
        clipped = torch.empty(n_max, V, dtype=torch.bool, device=h_s.device)
        for a in range(0, h_s.shape[0], chunk_size):
            hs, ht, k = h_s[a : a + chunk_size], h_t[a : a + chunk_size], coef[a : a + chunk_size].float()
            n = hs.shape[0]
            log_p_s = _tempered_log_softmax(hs, w_s, temperature, buf_s[:n])
            log_p_t = _tempered_log_softmax(ht, w_t, temperature, buf_t[:n])
            p_t = torch.exp(log_p_t, out=buf_p[:n])
            pointwise = log_p_t.sub_(log_p_s).mul_(p_t)  # p_T (log p_T - log p_S), in log_p_t's buffer
            if clip > 0:
                mask = torch.gt(pointwise, clip, out=clipped[:n])
                p_t.masked_fill_(mask, 0.0)  # p_t now holds m_v * p_T(v): clipped entries get no gradient
                pointwise.clamp_(max=clip)
            l = pointwise.sum(-1)
            per_token[a : a + chunk_size] = l
            total += (k * l).sum()
            if need_h or need_w:
                g = log_p_s.exp_().mul_(p_t.sum(-1, keepdim=True)).sub_(p_t)  # d l_t / d z_S * T, in log_p_s's buffer
                scale = (k / temperature)[:, None]  # coef_t / T, applied to the small [n, H] results
                if need_h:
                    grad_h[a : a + chunk_size] = ((g.to(w_s.dtype) @ w_s) * scale).to(h_s.dtype)
                if need_w:
                    grad_w.addmm_(g.T, hs.float() * scale)
        ctx.w_dtype = w_s.dtype
        ctx.save_for_backward(grad_h, grad_w)
        ctx.mark_non_differentiable(per_token)
        return total, per_token

    @staticmethod
    def backward(ctx, grad_total, _grad_per_token):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_total.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_total).to(ctx.w_dtype) if grad_w is not None else None
        return gh, None, gw, None, None, None, None, None


def chunked_clipped_fkl(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, student_head: torch.Tensor,
                        teacher_head: torch.Tensor, coef: torch.Tensor, temperature: float = 1.1, clip: float = 0.05,
                        chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum_t coef_t * l_t`` of the clipped forward KL, from hidden states, O(chunk_size x V) memory.

    Args:
        student_hidden: ``[N, H]`` final hidden states (lm_head inputs) of the student; carries the gradient.
        teacher_hidden: ``[N, H]`` of the teacher, computed under ``no_grad``.
        student_head / teacher_head: lm_head weights ``[V, H]`` (the same tensor under LoRA). The student
            head gets a gradient only if it requires grad (full fine-tuning).
        coef: ``[N]`` from ``token_coefficients`` (weights and reduction).
        temperature, clip: as in ``clipped_forward_kl``.
        chunk_size: tokens per chunk; peak extra memory ~ 3.25 x chunk_size x V x 4 bytes (three float32
            buffers and a bool mask, reused by every chunk), e.g. 1.0 GB for 512 tokens of Qwen3's
            151,936-entry vocabulary.
    Returns:
        ``(loss, per_token)``: scalar float32 with a gradient; ``[N]`` float32 detached per-token l_t.
    Matches ``(coef * clipped_forward_kl(h_s @ W.T, h_t @ W.T)).sum()`` within float32 rounding.
    """
    if chunk_size < 1:
        raise ValueError(f"--loss_chunk_size must be >= 1, got {chunk_size}")
    return _ChunkedClippedFKL.apply(student_hidden, teacher_hidden.detach(), student_head, teacher_head.detach(),
                                    coef.detach(), float(temperature), float(clip), int(chunk_size))


# ==================================================================================================
# ALGORITHM: per-step losses on full logits. Signature: (student_logits [N, V] with grad,
# teacher_logits [N, V], ctx: LossContext, hp: the training Args) -> (scalar loss = this micro-batch's
# share of the step loss, {diagnostic: float}).
# ==================================================================================================
def clipped_fkl_loss(student_logits, teacher_logits, ctx, hp):
    """OPSD / PW-OPSD: ``sum_t coef_t * l_t`` with the clipped forward KL of ``clipped_forward_kl`` (the default,
    ``hp.beta`` 0 and ``hp.teacher_top_k`` 0); ``clipped_generalized_jsd`` when ``hp.beta`` > 0;
    ``clipped_topk_forward_kl`` when ``hp.teacher_top_k`` > 0 (train.py refuses both at once)."""
    beta, top_k = getattr(hp, "beta", 0.0), getattr(hp, "teacher_top_k", 0)
    if top_k > 0:
        per_token = clipped_topk_forward_kl(student_logits, teacher_logits, hp.temperature, hp.clip, top_k)
    elif beta > 0:
        per_token = clipped_generalized_jsd(student_logits, teacher_logits, hp.temperature, hp.clip, beta)
    else:
        per_token = clipped_forward_kl(student_logits, teacher_logits, hp.temperature, hp.clip,
                                       getattr(hp, "clip_mode", "pointwise"))
    return (ctx.coef * per_token).sum(), {}


def sft_loss(student_logits, teacher_logits, ctx, hp):
    """SFT baseline (OPSD paper, arXiv:2601.18734, Sec. 5 baselines): cross-entropy of the reference solution.

    Here ``ctx.tokens`` ``[N]`` are the reference solution's tokens plus EOS (train.py feeds them as the
    step's completions instead of rollouts; no teacher pass, ``teacher_logits`` is ``None``), read under
    the student prompt. ``l_t = -log softmax(student_logits)[y_t]`` at temperature 1 (plain likelihood, not
    ``hp.temperature``); ``loss = sum_t coef_t l_t`` -- with the row's uniform / token defaults, the mean
    over the step's solution tokens. Diagnostic ``token_accuracy``: fraction of tokens that are the argmax.
    """
    log_p = F.log_softmax(student_logits.float(), dim=-1)
    nll = -log_p.gather(1, ctx.tokens[:, None])[:, 0]
    acc = (student_logits.detach().argmax(-1) == ctx.tokens).float().mean().item()
    return (ctx.coef * nll).sum(), {"token_accuracy": acc}


# --------------------------------------------------------------------------------------------------
# Method variants on the sampled token y_t: the paper's baselines and a common recipe. Like the
# clipped forward KL they read both models at hp.temperature (1.1): every log-prob and entropy below is
# of softmax(logits / T), student and teacher alike. None applies the point-wise clip c.
# --------------------------------------------------------------------------------------------------
def sampled_token_terms(student_logits, teacher_logits, tokens, temperature):
    """Tempered log-probs ``(log_p_s [N, V], log_p_t [N, V], lp_s [N], lp_t [N])``, float32; ``lp_*`` are
    at the sampled tokens ``tokens [N]``. Only the student's carry a gradient."""
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    y = tokens[:, None]
    return log_p_s, log_p_t, log_p_s.gather(1, y)[:, 0], log_p_t.gather(1, y)[:, 0]


def entropy(log_p: torch.Tensor) -> torch.Tensor:
    """``[N, V]`` log-probs -> ``[N]`` entropy, nats."""
    return -(log_p.exp() * log_p).sum(-1)


def sampled_rkl_loss(student_logits, teacher_logits, ctx, hp):
    """Sampled-token reverse KL as a policy gradient (MiniLLM, Gu et al. 2024; "On-Policy Distillation",
    Thinking Machines 2025): with the per-token reward R_t = sg(log p_T(y_t) - log p_S(y_t)),

        l_t = -R_t * log p_S(y_t),        loss = sum_t coef_t l_t   (uniform / token: global token mean)

    Since E_{y ~ p_S}[grad log p_S(y)] = 0, the expected gradient is that of KL(p_S || p_T) per token.
    Diagnostic ``rkl_k1``: mean of -R_t, the one-sample estimate of that reverse KL (nats).
    """
    _, _, lp_s, lp_t = sampled_token_terms(student_logits, teacher_logits, ctx.tokens, hp.temperature)
    reward = (lp_t - lp_s).detach()
    return -(ctx.coef * reward * lp_s).sum(), {"rkl_k1": -reward.mean().item()}


def iwopd_loss(student_logits, teacher_logits, ctx, hp):
    """IW-OPD, importance-weighted on-policy distillation (Xie et al. 2026, arXiv:2606.22600): the sampled-token
    reverse KL policy gradient of ``sampled_rkl_loss`` with each token's advantage scaled by ``iwopd_weights``:

        A_t = sg(log p_T(y_t) - log p_S(y_t)),   w_t = iwopd_weights(A)_t  (gamma = hp.iwopd_gamma, 0.5)
        l_t = -w_t A_t log p_S(y_t),             loss = sum_t coef_t l_t   (uniform / token: global token mean)

    Diagnostics: ``iw_weight_mean`` / ``iw_weight_min`` (of this micro-batch's w_t), ``rkl_k1`` (mean of -A_t).
    """
    _, _, lp_s, lp_t = sampled_token_terms(student_logits, teacher_logits, ctx.tokens, hp.temperature)
    adv = (lp_t - lp_s).detach()
    w = iwopd_weights(ctx.lengths, adv, hp.iwopd_gamma)
    return -(ctx.coef * w * adv * lp_s).sum(), {"iw_weight_mean": w.mean().item(), "iw_weight_min": w.min().item(),
                                                "rkl_k1": -adv.mean().item()}


def eopd_loss(student_logits, teacher_logits, ctx, hp):
    """EOPD, entropy-aware on-policy distillation (Jin et al. 2026, arXiv:2603.07079), per token t:

        A_t  = sg(log p_T(y_t) - log p_S(y_t))                      advantage
        r_t  = exp(log p_S(y_t) - sg(log p_S(y_t)))                  PPO ratio; 1 on-policy, kept for the form
        pg_t = -min(r_t A_t, clip(r_t, 1 - eps, 1 + eps) A_t)           eps = hp.eopd_clip_eps (0.2)
        kl_t = sum_{v in K_t} q(v) (log q(v) - log p_S(v))           K_t = teacher's top-k (hp.eopd_top_k, 16),
                                                                     q = p_T renormalised over K_t, p_S full-vocab
        l_t  = pg_t + 1[H(p_T) > h] kl_t                             h = hp.eopd_entropy_threshold (0.8 nats),
                                                                     H = teacher's full-vocabulary entropy
        loss = sum_t coef_t l_t                                      (uniform / token: global token mean)

    On-policy the gradient of pg_t is -A_t grad log p_S(y_t). Diagnostics: ``high_entropy_frac`` (gate
    open), ``clip_frac`` (|r_t - 1| > eps), ``topk_kl`` (mean kl_t where the gate is open), ``advantage_mean``.
    """
    log_p_s, log_p_t, lp_s, lp_t = sampled_token_terms(student_logits, teacher_logits, ctx.tokens, hp.temperature)
    adv = (lp_t - lp_s).detach()
    ratio = torch.exp(lp_s - lp_s.detach())
    eps = hp.eopd_clip_eps
    pg = -torch.minimum(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv)
    top_lp_t, top_ids = log_p_t.topk(min(hp.eopd_top_k, log_p_t.shape[-1]), dim=-1)
    log_q = top_lp_t - top_lp_t.logsumexp(-1, keepdim=True)
    kl = (log_q.exp() * (log_q - log_p_s.gather(1, top_ids))).sum(-1)
    gate = entropy(log_p_t) > hp.eopd_entropy_threshold
    loss = (ctx.coef * (pg + gate * kl)).sum()
    return loss, {"high_entropy_frac": gate.float().mean().item(),
                  "clip_frac": ((ratio.detach() - 1).abs() > eps).float().mean().item(),
                  "topk_kl": kl[gate].mean().item() if gate.any() else 0.0, "advantage_mean": adv.mean().item()}


def reopold_token_stats(student_logits, teacher_logits, tokens, hp):
    """REOPOLD's per-token statistics, no gradient: ``[N, 2]`` float32 = (student entropy H(p_S) in nats,
    reward R_t = log p_T(y_t) - log p_S(y_t)). train.py computes them for the whole step before the
    first backward (see ``reopold_loss``)."""
    with torch.no_grad():
        log_p_s, _, lp_s, lp_t = sampled_token_terms(student_logits, teacher_logits, tokens, hp.temperature)
        return torch.stack([entropy(log_p_s), lp_t - lp_s], dim=-1)


def reopold_loss(student_logits, teacher_logits, ctx, hp):
    """REOPOLD, relaxed on-policy distillation (Ko et al. 2026, arXiv:2603.11137), per token t:

        R_t   = sg(log p_T(y_t) - log p_S(y_t))        reward;   floor f = log(lam / (1 - lam)), lam = hp.reopold_lambda (0.1)
        R^_t  = max(R_t, f)
        M_t   = 1[R_t >= f]                            while step < hp.reopold_switch_step (50)
              = 1[H(p_S)_t >= k-th largest H(p_S) of the batch],  k = ceil(rho * tokens), rho = hp.reopold_entropy_top (0.2)
        loss  = -sum_t R^_t M_t log p_S(y_t) / sum_t M_t     (sum(M) = 0 -> 0; ignores ctx.coef)

    "The batch" is the whole optimizer step (all micro-batches, all processes), like ``total_tokens``: train.py
    passes ``ctx.token_stats`` (this micro-batch's ``reopold_token_stats``) and ``ctx.step_token_stats``
    (the step's), so the threshold and sum(M) do not depend on micro-batching. Without them these N tokens
    are the batch. Diagnostics: ``mask_frac``, ``floor_frac`` (of kept tokens), ``reward_mean``, ``entropy_threshold``.
    """
    _, _, lp_s, _ = sampled_token_terms(student_logits, teacher_logits, ctx.tokens, hp.temperature)
    mine = ctx.token_stats
    mine = reopold_token_stats(student_logits, teacher_logits, ctx.tokens, hp) if mine is None else mine
    batch = mine if ctx.step_token_stats is None else ctx.step_token_stats
    floor = math.log(hp.reopold_lambda / (1 - hp.reopold_lambda))
    stats = {}
    if ctx.step < hp.reopold_switch_step:
        mask, total = mine[:, 1] >= floor, (batch[:, 1] >= floor).sum().item()
    else:
        threshold = batch[:, 0].topk(math.ceil(hp.reopold_entropy_top * len(batch))).values[-1]
        mask, total = mine[:, 0] >= threshold, (batch[:, 0] >= threshold).sum().item()
        stats["entropy_threshold"] = threshold.item()
    r_hat = mine[:, 1].clamp(min=floor)
    loss = -(r_hat * mask * lp_s).sum() / max(total, 1)
    stats.update(mask_frac=total / len(batch), reward_mean=batch[:, 1].mean().item(),
                 floor_frac=(mask & (mine[:, 1] < floor)).sum().item() / max(mask.sum().item(), 1))
    return loss, stats


LOSSES = {"clipped_fkl": clipped_fkl_loss, "sampled_rkl": sampled_rkl_loss, "eopd": eopd_loss, "reopold": reopold_loss,
          "iwopd": iwopd_loss, "sft": sft_loss}
# Losses trained on the reference solution instead of rollouts: train.py samples nothing and runs no teacher.
REFERENCE_TARGETS = {"sft"}
# Losses whose token selection needs statistics of the whole step: train.py computes these per-token
# statistics in a no-grad pass over all micro-batches before the first backward (ctx.token_stats).
TOKEN_STATS = {"reopold": reopold_token_stats}


# --------------------------------------------------------------------------------------------------
# Fast paths: (loss, --loss_impl) -> the same loss computed from hidden states, without [N, V] logits.
# Signature: (student_hidden [N, H], teacher_hidden [N, H], student_head [V, H], teacher_head [V, H],
# ctx, hp) -> (loss, {diagnostic: float}). A (loss, impl) pair not listed here runs LOSSES on full logits.
# --------------------------------------------------------------------------------------------------
def chunked_clipped_fkl_loss(student_hidden, teacher_hidden, student_head, teacher_head, ctx, hp):
    """``clipped_fkl_loss`` via ``chunked_clipped_fkl``: O(``hp.loss_chunk_size`` x V) memory. With ``hp.beta`` > 0,
    ``hp.teacher_top_k`` > 0 or a ``hp.clip_mode`` other than ``pointwise`` (the hand-written gradient is the
    point-wise clip's), via ``checkpointed_chunks`` of the same reference functions instead."""
    if getattr(hp, "beta", 0.0) > 0 or getattr(hp, "teacher_top_k", 0) > 0 or \
            getattr(hp, "clip_mode", "pointwise") != "pointwise":
        return checkpointed_chunks(clipped_fkl_loss, student_hidden, teacher_hidden, student_head, teacher_head, ctx,
                                   hp), {}
    loss, _ = chunked_clipped_fkl(student_hidden, teacher_hidden, student_head, teacher_head, ctx.coef,
                                  hp.temperature, hp.clip, hp.loss_chunk_size)
    return loss, {}


def checkpointed_chunks(loss_fn, student_hidden, teacher_hidden, student_head, teacher_head, ctx, hp) -> torch.Tensor:
    """A per-token logits loss (``loss_fn(student_logits, teacher_logits, ctx, hp)`` reading only ``ctx.coef``) summed
    over chunks of ``hp.loss_chunk_size`` tokens, each under activation checkpointing: its ``[chunk, V]``
    intermediates are freed after the forward and recomputed in the backward, so memory is one chunk's, not N's.
    Same value and gradient as ``loss_fn`` on the full logits (autograd of the same code); costs one extra forward
    of the loss. Used for the generalized JSD, the top-k loss and the non-point-wise clip modes, which have no
    hand-written gradient."""
    import copy

    from torch.utils.checkpoint import checkpoint

    def one_chunk(h_s, h_t, coef):
        part = copy.copy(ctx)
        part.coef = coef
        return loss_fn(h_s @ student_head.T, h_t @ teacher_head.T, part, hp)[0]

    n, size = student_hidden.shape[0], int(hp.loss_chunk_size)
    total = torch.zeros((), dtype=torch.float32, device=student_hidden.device)
    for a in range(0, n, size):
        total = total + checkpoint(one_chunk, student_hidden[a:a + size], teacher_hidden[a:a + size].detach(),
                                   ctx.coef[a:a + size], use_reentrant=False)
    return total


FAST_PATHS = {("clipped_fkl", "chunked"): chunked_clipped_fkl_loss}
LOSS_IMPLS = ("chunked", "reference")


def step_loss(loss: str, impl: str, student_hidden, teacher_hidden, student_head, teacher_head, ctx, hp):
    """This micro-batch's share of the step loss and its diagnostics, from final hidden states ``[N, H]``
    and lm_head weights ``[V, H]``: the registered fast path for ``(loss, impl)`` if there is one, else
    ``LOSSES[loss]`` on the full ``[N, V]`` logits (the readable reference, and every other method).
    ``teacher_hidden`` is ``None`` for the losses in ``REFERENCE_TARGETS`` (no teacher pass)."""
    fast = FAST_PATHS.get((loss, impl))
    if fast is not None:
        return fast(student_hidden, teacher_hidden, student_head, teacher_head, ctx, hp)
    teacher_logits = None if teacher_hidden is None else teacher_hidden @ teacher_head.T
    return LOSSES[loss](student_hidden @ student_head.T, teacher_logits, ctx, hp)
