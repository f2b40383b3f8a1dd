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

import torch
import torch.nn.functional as F


# --------------------------------------------------------------------------------------------------
# Reference: clipped forward KL on full logits
# --------------------------------------------------------------------------------------------------
def clipped_forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.1,
                       clip: float = 0.05) -> torch.Tensor:
    """Point-wise clipped forward KL per token (OPSD Eq. 4).

    Args:
        student_logits: ``[N, V]``, any float dtype (computed in float32); carries the gradient.
        teacher_logits: ``[N, V]``; detached here (the teacher gets no gradient).
        temperature: both logits are divided by it (paper: 1.1).
        clip: c; each vocabulary entry ``p_T (log p_T - log p_S)`` is capped at c before the sum.
            ``clip <= 0`` disables clipping (plain forward KL).
    Returns:
        ``[N]`` float32, nats.
    """
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    pointwise = log_p_t.exp() * (log_p_t - log_p_s)
    if clip > 0:
        pointwise = pointwise.clamp(max=clip)  # clamp's gradient is 0 where the entry is clipped
    return pointwise.sum(-1)


# --------------------------------------------------------------------------------------------------
# Token weights and reductions
# --------------------------------------------------------------------------------------------------
def token_positions(lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``lengths [B]`` (int) -> ``(seq_index [N], t [N])`` with t = 1..L_i within each sequence."""
    seq = torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    t = torch.arange(int(lengths.sum()), device=lengths.device) - starts[seq] + 1
    return seq, t


def uniform_weights(lengths: torch.Tensor, **_) -> torch.Tensor:
    """OPSD: every token weighs 1. ``[N]`` float32."""
    return torch.ones(int(lengths.sum()), device=lengths.device)


def position_weights(lengths: torch.Tensor, w_min: float = 0.25, tau: float = 0.30, s: float = 0.10, **_) -> torch.Tensor:
    """PW-OPSD Eq. 3: ``w_min + (1 - w_min) * sigmoid((frac_t - tau) / s)``, frac_t = (t - 0.5) / L_i.

    Not renormalised: early tokens are down-weighted, late ones kept at ~1. ``[N]`` float32.
    """
    seq, t = token_positions(lengths)
    frac = (t.float() - 0.5) / lengths[seq].float()
    return w_min + (1 - w_min) * torch.sigmoid((frac - tau) / s)


def linear_weights(lengths: torch.Tensor, w_min: float = 0.25, **_) -> torch.Tensor:
    """Example variant (README, "Add your own variant"): a linear ramp from w_min at the first token to 1
    at the last, ``w_min + (1 - w_min) * frac_t``. ``[N]`` float32."""
    seq, t = token_positions(lengths)
    return w_min + (1 - w_min) * (t.float() - 0.5) / lengths[seq].float()


WEIGHTINGS = {"uniform": uniform_weights, "position": position_weights, "linear": linear_weights}


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


# --------------------------------------------------------------------------------------------------
# Memory-lean path: the same loss from hidden states, chunk by chunk
# --------------------------------------------------------------------------------------------------
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
        for a in range(0, h_s.shape[0], chunk_size):
            hs, ht, k = h_s[a : a + chunk_size], h_t[a : a + chunk_size], coef[a : a + chunk_size].float()
            log_p_s = torch.log_softmax((hs @ w_s.T).float().div_(temperature), dim=-1)
            log_p_t = torch.log_softmax((ht @ w_t.T).float().div_(temperature), dim=-1)
            p_t = log_p_t.exp()
            pointwise = log_p_t.sub_(log_p_s).mul_(p_t)  # reuses log_p_t's buffer
            if clip > 0:
                kept = pointwise <= clip
                pointwise.clamp_(max=clip)
                p_t.mul_(kept)  # p_t now holds m_v * p_T(v)
                del kept
            l = pointwise.sum(-1)
            del pointwise
            per_token[a : a + chunk_size] = l
            total += (k * l).sum()
            if need_h or need_w:
                g = log_p_s.exp_().mul_(p_t.sum(-1, keepdim=True)).sub_(p_t)  # reuses log_p_s's buffer
                g.mul_((k / temperature)[:, None])
                if need_h:
                    grad_h[a : a + chunk_size] = (g.to(w_s.dtype) @ w_s).to(h_s.dtype)
                if need_w:
                    grad_w.addmm_(g.T, hs.float())
            del log_p_s, p_t
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
        chunk_size: tokens per chunk; peak extra memory ~ 3 x chunk_size x V float32.
    Returns:
        ``(loss, per_token)``: scalar float32 with a gradient; ``[N]`` float32 detached per-token l_t.
    Matches ``(coef * clipped_forward_kl(h_s @ W.T, h_t @ W.T)).sum()`` within float32 rounding.
    """
    if chunk_size < 1:
        raise ValueError(f"--loss_chunk_size must be >= 1, got {chunk_size}")
    return _ChunkedClippedFKL.apply(student_hidden, teacher_hidden.detach(), student_head, teacher_head.detach(),
                                    coef.detach(), float(temperature), float(clip), int(chunk_size))


# --------------------------------------------------------------------------------------------------
# Per-step losses on full logits. Signature: (student_logits [N, V] with grad, teacher_logits [N, V],
# ctx, hp) -> (scalar loss = this micro-batch's share of the step loss, {diagnostic: float}).
# ctx: tokens [N] (sampled ids), lengths [B], coef [N] (weights / reduction), total_tokens and
# total_sequences (whole step, all processes), step (0-based). hp: the training Args (hyperparameters).
# --------------------------------------------------------------------------------------------------
def clipped_fkl_loss(student_logits, teacher_logits, ctx, hp):
    """OPSD / PW-OPSD: ``sum_t coef_t * l_t`` with the clipped forward KL of ``clipped_forward_kl``."""
    per_token = clipped_forward_kl(student_logits, teacher_logits, hp.temperature, hp.clip)
    return (ctx["coef"] * per_token).sum(), {}


LOSSES = {"clipped_fkl": clipped_fkl_loss}

# --------------------------------------------------------------------------------------------------
# Methods: which per-step loss, weighting and reduction ``--method`` selects
# --------------------------------------------------------------------------------------------------
METHODS = {
    # name: (per-token loss, default weighting, default reduction)
    "opsd": ("clipped_fkl", "uniform", "token"),      # OPSD (arXiv:2601.18734)
    "pwopsd": ("clipped_fkl", "position", "sequence"),  # PW-OPSD (arXiv:2605.21606)
    "pwopsd-linear": ("clipped_fkl", "linear", "sequence"),  # README example: a new weighting
}


def mean_weight_stats(weights: torch.Tensor) -> dict:
    if weights.numel() == 0:
        return {"weight_mean": math.nan, "weight_min": math.nan, "weight_max": math.nan}
    return {"weight_mean": weights.mean().item(), "weight_min": weights.min().item(), "weight_max": weights.max().item()}
