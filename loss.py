"""The loss: the method table, the point-wise clipped forward KL, token weights, reductions; then the baselines.

Completion tokens are *packed* (sequence 0's, then 1's, ...): N in all, ``lengths[i]`` of sequence i; per-token
tensors are ``[N]``, logits ``[N, V]``, hidden states ``[N, H]``. Per-token loss (OPSD arXiv:2601.18734 Eq. 4, PW-OPSD
arXiv:2605.21606 Eq. 2; logits / T, gradient through the student only), token weight (PW-OPSD Eq. 3; OPSD: 1) and
step loss, normalised over the whole optimizer step (all micro-batches and processes). Notes: docs/loss_notes.md.

    l_t  = sum_v min( p_T(v) * (log p_T(v) - log p_S(v)), c )
    w_t  = w_min + (1 - w_min) * sigmoid((frac_t - tau) / s),   frac_t = (t - 0.5) / L_i
    loss = sum_t coef_t l_t,   coef_t = w_t / (step's tokens)  |  w_t / (L_i * step's sequences)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from pwopsd import fused


# ==== THE METHOD: which per-token loss, token weighting and reduction ``--method`` selects ==========
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
CLIP_MODES = ("pointwise", "total", "scaled")  # where the clip c acts: see clip_kl_terms


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


def clipped_forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.1,
                       clip: float = 0.05, clip_mode: str = "pointwise") -> torch.Tensor:
    """Point-wise clipped forward KL l_t (OPSD Eq. 4) or a variant clip (``CLIP_MODES``): logits ``[N, V]`` (any float
    dtype, computed in float32; the teacher's detached) -> ``[N]`` float32 nats. ``clip <= 0``: plain forward KL.
    Raises ValueError on an unknown clip_mode."""
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    return clip_kl_terms(log_p_t.exp() * (log_p_t - log_p_s), clip, clip_mode)


def clip_kl_terms(pointwise: torch.Tensor, clip: float, mode: str = "pointwise") -> torch.Tensor:
    """Per-token loss ``[N]`` from the entries ``x_v = p_T(v) (log p_T(v) - log p_S(v))`` ``[N, V]``, float32 nats.
    ``pointwise`` (the paper): ``sum_v min(x_v, c)``; a clipped entry has no gradient, so a clipped teacher top-1 is
    pushed *down*. ``total``: ``min(KL_t, c)``, the KL's gradient times ``min(1, c / KL_t)``. ``scaled``: value as
    ``pointwise``, a clipped entry's gradient times ``c / x_v`` (docs/loss_notes.md). ValueError: unknown mode."""
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


# ---- token weights (PW-OPSD Eq. 3) ----------------------------------------------------------------
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
    """PW-OPSD token weights ``position_schedule(frac_t)``, not renormalised (late tokens keep ~1). ``[N]`` float32."""
    return position_schedule(relative_positions(lengths), w_min, tau, s)


def linear_weights(lengths: torch.Tensor, w_min: float = 0.25, **_) -> torch.Tensor:
    """Example variant (README, "Add your own variant"): ``w_min + (1 - w_min) * frac_t``. ``[N]`` float32."""
    return w_min + (1 - w_min) * relative_positions(lengths)


WEIGHTINGS = {"uniform": uniform_weights, "position": position_weights, "linear": linear_weights}


# ---- reductions and the step loss -----------------------------------------------------------------
def token_coefficients(lengths: torch.Tensor, weights: torch.Tensor, reduction: str, total_tokens: float,
                       total_sequences: float) -> torch.Tensor:
    """``coef [N]`` with step loss ``sum_t coef_t * l_t``: ``token`` -> ``w_t / total_tokens``, ``sequence`` ->
    ``w_t / (L_i * total_sequences)``; lengths ``[B]`` and weights ``[N]`` of this micro-batch, counts of the whole
    step. Raises ValueError on an unknown reduction."""
    if reduction == "token":
        return weights / total_tokens
    if reduction == "sequence":
        seq, _ = token_positions(lengths)
        return weights / (lengths[seq].float() * total_sequences)
    raise ValueError(f"--reduction: unknown {reduction!r} (token|sequence)")


def clipped_fkl_loss(student_logits, teacher_logits, ctx, hp):
    """OPSD / PW-OPSD on full logits: ``(sum_t coef_t * l_t, {})``, l_t from ``clipped_forward_kl``, or
    ``clipped_generalized_jsd`` if ``hp.beta`` > 0, ``clipped_topk_forward_kl`` if ``hp.teacher_top_k`` > 0."""
    beta, top_k = getattr(hp, "beta", 0.0), getattr(hp, "teacher_top_k", 0)
    if top_k > 0:
        per_token = clipped_topk_forward_kl(student_logits, teacher_logits, hp.temperature, hp.clip, top_k)
    elif beta > 0:
        per_token = clipped_generalized_jsd(student_logits, teacher_logits, hp.temperature, hp.clip, beta)
    else:
        per_token = clipped_forward_kl(student_logits, teacher_logits, hp.temperature, hp.clip,
                                       getattr(hp, "clip_mode", "pointwise"))
    return (ctx.coef * per_token).sum(), {}


def step_loss(loss_name: str, loss_impl: str, h_s, h_t, student_head, teacher_head, ctx: LossContext, args):
    """This micro-batch's share of the step loss and diagnostics ``(scalar, {name: float})`` from final hidden states
    ``[N, H]`` (``h_t`` None for ``REFERENCE_TARGETS``) and lm_heads ``[V, H]``: the ``FAST_PATHS`` entry (the
    default; = ``clipped_fkl_loss`` without ``[N, V]`` logits), else ``LOSSES[loss_name]`` on the logits."""
    fast = FAST_PATHS.get((loss_name, loss_impl))
    variant = getattr(args, "beta", 0.0) > 0 or getattr(args, "teacher_top_k", 0) > 0 or \
        getattr(args, "clip_mode", "pointwise") != "pointwise"  # the fused gradient is the point-wise clip's only
    if fast is not None and not variant:  # the clipped forward KL, fused: sum_t coef_t l_t and its gradient
        return fast(h_s, h_t, student_head, teacher_head, ctx.coef, args.temperature, args.clip,
                    args.loss_chunk_size)[0], {}
    if fast is not None:  # variants: the reference code, chunk by chunk under activation checkpointing
        return fused.checkpointed_chunks(LOSSES[loss_name], h_s, h_t, student_head, teacher_head, ctx, args), {}
    teacher_logits = None if h_t is None else h_t @ teacher_head.T
    return LOSSES[loss_name](h_s @ student_head.T, teacher_logits, ctx, args)


# ==== BASELINES: the other methods' losses, and the --beta / --teacher_top_k variants ======================
# (student_logits [N, V], teacher_logits [N, V], ctx, hp) -> (loss, {name: float}); both read at hp.temperature.
def clipped_generalized_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.1,
                            clip: float = 0.05, beta: float = 0.0) -> torch.Tensor:
    """Clipped generalized JSD (``--beta``; GKD, Agarwal et al. 2024, Eq. 1), ``[N]`` float32 nats: ``l_t = sum_v
    min(e(v), c)``, ``e = beta p_T log(p_T / m) + (1 - beta) p_S log(p_S / m)``, ``m = beta p_T + (1 - beta) p_S``.
    beta = 0 is exactly ``clipped_forward_kl``, beta = 1 the reverse KL. ValueError: beta not in [0, 1]."""
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
    """Clipped forward KL over the teacher's top-k tokens K_t plus a tail bucket holding each side's remaining mass
    (``--teacher_top_k``; k >= V: exactly ``clipped_forward_kl``), ``[N]`` float32 nats. Raises ValueError: k < 1."""
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


def sft_loss(student_logits, teacher_logits, ctx, hp):
    """SFT baseline (OPSD Sec. 5): ``sum_t coef_t * -log softmax(student_logits)[y_t]`` at T = 1; ``ctx.tokens`` are the
    reference solution + EOS (``teacher_logits`` None). Diagnostic ``token_accuracy``: argmax == y_t."""
    log_p = F.log_softmax(student_logits.float(), dim=-1)
    nll = -log_p.gather(1, ctx.tokens[:, None])[:, 0]
    acc = (student_logits.detach().argmax(-1) == ctx.tokens).float().mean().item()
    return (ctx.coef * nll).sum(), {"token_accuracy": acc}


def sampled_token_terms(student_logits, teacher_logits, tokens, temperature):
    """Tempered float32 ``(log_p_s, log_p_t [N, V], lp_s, lp_t [N] at tokens [N])``; only the student's have a grad."""
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    y = tokens[:, None]
    return log_p_s, log_p_t, log_p_s.gather(1, y)[:, 0], log_p_t.gather(1, y)[:, 0]


def entropy(log_p: torch.Tensor) -> torch.Tensor:
    """``[N, V]`` log-probs -> ``[N]`` entropy, nats."""
    return -(log_p.exp() * log_p).sum(-1)


def sampled_rkl_loss(student_logits, teacher_logits, ctx, hp):
    """Sampled-token reverse KL as a policy gradient (MiniLLM, Gu et al. 2024): ``l_t = -R_t log p_S(y_t)``, R_t =
    sg(log p_T(y_t) - log p_S(y_t)); expected gradient = KL(p_S || p_T)'s. Diagnostic ``rkl_k1``: mean of -R_t."""
    _, _, lp_s, lp_t = sampled_token_terms(student_logits, teacher_logits, ctx.tokens, hp.temperature)
    reward = (lp_t - lp_s).detach()
    return -(ctx.coef * reward * lp_s).sum(), {"rkl_k1": -reward.mean().item()}


def iwopd_weights(lengths: torch.Tensor, discrepancy: torch.Tensor, gamma: float = 0.5, eps: float = 1e-8) -> torch.Tensor:
    """IW-OPD token weights (arXiv:2606.22600, Alg. 1), per sequence: ``w_t = 1 + gamma (1 - D_t / S)``, D_t = the
    sum of |discrepancy| before t, S = max(its total, eps). lengths ``[B]``, discrepancy ``[N]`` -> ``[N]`` float32."""
    a = discrepancy.detach().double().abs()
    seq, _ = token_positions(lengths)
    totals = torch.zeros(len(lengths), dtype=torch.float64, device=a.device).index_add_(0, seq, a)
    before = torch.cumsum(a, 0) - a - (torch.cumsum(totals, 0) - totals)[seq]  # D_t: the sum before t, same sequence
    return (1 + gamma * (1 - before / totals.clamp(min=eps)[seq])).float()


def iwopd_loss(student_logits, teacher_logits, ctx, hp):
    """IW-OPD (Xie et al. 2026): ``sampled_rkl_loss`` with its advantage A_t = R_t weighted, ``l_t = -w_t A_t log
    p_S(y_t)``, ``w = iwopd_weights(A, hp.iwopd_gamma)``. Diagnostics ``iw_weight_mean`` / ``_min``, ``rkl_k1``."""
    _, _, lp_s, lp_t = sampled_token_terms(student_logits, teacher_logits, ctx.tokens, hp.temperature)
    adv = (lp_t - lp_s).detach()
    w = iwopd_weights(ctx.lengths, adv, hp.iwopd_gamma)
    return -(ctx.coef * w * adv * lp_s).sum(), {"iw_weight_mean": w.mean().item(), "iw_weight_min": w.min().item(),
                                                "rkl_k1": -adv.mean().item()}


def eopd_loss(student_logits, teacher_logits, ctx, hp):
    """EOPD, entropy-aware OPD (Jin et al. 2026, arXiv:2603.07079); K_t, q: p_T's top ``hp.eopd_top_k``, renormalised:

        A_t = sg(log p_T(y_t) - log p_S(y_t)),   r_t = exp(log p_S(y_t) - sg(log p_S(y_t)))   (PPO ratio, 1 on-policy)
        l_t = -min(r_t A_t, clip(r_t, 1 - eps, 1 + eps) A_t) + 1[H(p_T) > h] sum_{v in K_t} q(v) log(q(v) / p_S(v))
    eps = ``hp.eopd_clip_eps``, h = ``hp.eopd_entropy_threshold``."""
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
    reward R_t = log p_T(y_t) - log p_S(y_t)); train.py gathers them for the whole step (``ctx.step_token_stats``)."""
    with torch.no_grad():
        log_p_s, _, lp_s, lp_t = sampled_token_terms(student_logits, teacher_logits, tokens, hp.temperature)
        return torch.stack([entropy(log_p_s), lp_t - lp_s], dim=-1)


def reopold_loss(student_logits, teacher_logits, ctx, hp):
    """REOPOLD, relaxed on-policy distillation (Ko et al. 2026, arXiv:2603.11137): R_t as in ``reopold_token_stats``,
    f = log(lam / (1 - lam)), lam = ``hp.reopold_lambda``; the batch = the step's ``ctx.step_token_stats`` if given:

        M_t  = 1[R_t >= f] before step hp.reopold_switch_step; then 1[H(p_S)_t in the batch's hp.reopold_entropy_top]
        loss = -sum_t max(R_t, f) M_t log p_S(y_t) / sum_t M_t        (sum(M) = 0 -> 0; ignores ctx.coef)
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
REFERENCE_TARGETS = {"sft"}  # trained on the reference solution: train.py samples nothing and runs no teacher
TOKEN_STATS = {"reopold": reopold_token_stats}  # per-token statistics of the whole step, gathered before backward


# ==== FAST PATHS (speed, not method): (loss, --loss_impl) -> fn(h_s, h_t, W_s, W_t, coef, T, c, chunk) -> (loss, l_t)
# from hidden states, never the [N, V] logits. pwopsd/fused.py's chunked_clipped_fkl equals sum_t coef_t *
# clipped_forward_kl in value and gradient: tests/test_loss.py::test_chunked_equals_reference.
FAST_PATHS = {("clipped_fkl", "chunked"): fused.chunked_clipped_fkl}
LOSS_IMPLS = ("chunked", "reference")
