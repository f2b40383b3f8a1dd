"""Fast paths of the per-token loss (speed, not method): the clipped forward KL from hidden states, chunk by chunk.

``chunked_clipped_fkl`` gives the value and gradient of ``sum_t coef_t * loss.clipped_forward_kl(h_s W_s^T, h_t W_t^T)_t``
without ever holding the ``[N, V]`` logits; tests/test_loss.py::test_chunked_equals_reference holds the two equal.
``checkpointed_chunks`` runs any logits loss chunk by chunk under activation checkpointing (the variants with no
hand-written gradient). Memory and timings: docs/loss_notes.md. This module imports no stage file.
"""
from __future__ import annotations

import copy

import torch
from torch.utils.checkpoint import checkpoint


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
    """``sum_t coef_t * l_t`` of the point-wise clipped forward KL, from hidden states, O(chunk_size x V) memory.

    Args:
        student_hidden: ``[N, H]`` final hidden states (lm_head inputs) of the student; carries the gradient.
        teacher_hidden: ``[N, H]`` of the teacher, computed under ``no_grad``.
        student_head / teacher_head: lm_head weights ``[V, H]`` (the same tensor under LoRA). The student
            head gets a gradient only if it requires grad (full fine-tuning).
        coef: ``[N]`` from ``loss.token_coefficients`` (weights and reduction).
        temperature, clip: as in ``loss.clipped_forward_kl``.
        chunk_size: tokens per chunk; peak extra memory ~ 3.25 x chunk_size x V x 4 bytes.
    Returns:
        ``(loss, per_token)``: scalar float32 with a gradient; ``[N]`` float32 detached per-token l_t.
    Raises:
        ValueError: chunk_size < 1.
    """
    if chunk_size < 1:
        raise ValueError(f"--loss_chunk_size must be >= 1, got {chunk_size}")
    return _ChunkedClippedFKL.apply(student_hidden, teacher_hidden.detach(), student_head, teacher_head.detach(),
                                    coef.detach(), float(temperature), float(clip), int(chunk_size))


def checkpointed_chunks(loss_fn, student_hidden, teacher_hidden, student_head, teacher_head, ctx, hp) -> torch.Tensor:
    """A logits loss ``loss_fn(student_logits, teacher_logits, ctx, hp) -> (loss, stats)`` that reads only
    ``ctx.coef``, summed over chunks of ``hp.loss_chunk_size`` tokens, each under activation checkpointing: memory is
    one chunk's ``[chunk, V]``, not N's. Same value and gradient as ``loss_fn`` on the full logits (autograd of the
    same code), for one extra forward of the loss. Returns a scalar float32."""

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
