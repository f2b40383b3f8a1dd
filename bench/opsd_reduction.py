"""OPSD's reduction, ours vs the official trainer's, on one step's gradient (docs/fidelity.md, row "OPSD reduction").

Ours (loss.py, method opsd): the global token mean of the step -- sum of all per-token clipped forward KLs over the
step's completion tokens divided by their total count, however the step is split into processes and micro-batches.
Official (TRL GOLD's per-micro-batch loss, as SaFo-Lab/PW-OPSD runs it): a token mean per micro-batch, then the
mean over the step's micro-batches (gradient accumulation divides by the accumulation steps, DDP averages over
processes). Both are the same when every micro-batch holds the same number of tokens; they differ by a per
micro-batch factor N_total / (M x N_mb) otherwise (M micro-batches).

The step: the paper's layout, 32 rollouts = 4 processes x 4 per micro-batch x 2 accumulation (8 micro-batches of 4),
completion lengths log-uniform in [--min_len, --max_len] with a share --truncated at --max_len (rollouts that hit the
cap), on a small random Llama (2 layers, 64 wide, vocabulary 512; teacher = a second random model). Prints the
cosine between the two gradients, their relative difference and the spread of the per-micro-batch factor.

    python bench/opsd_reduction.py                  # ~10 s on one CPU core
"""
from __future__ import annotations

import argparse
import math
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch


def lengths_of_step(n: int, min_len: int, max_len: int, truncated: float, rng: random.Random) -> list[int]:
    """``n`` completion lengths: log-uniform in [min_len, max_len], a share ``truncated`` exactly max_len."""
    out = [max_len if rng.random() < truncated else int(math.exp(rng.uniform(math.log(min_len), math.log(max_len))))
           for _ in range(n)]
    rng.shuffle(out)
    return out


def main(argv=None):
    from transformers import LlamaConfig, LlamaForCausalLM

    import loss as L

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--processes", type=int, default=4)
    p.add_argument("--micro", type=int, default=4, help="rollouts per micro-batch")
    p.add_argument("--accumulation", type=int, default=2)
    p.add_argument("--min_len", type=int, default=64)
    p.add_argument("--max_len", type=int, default=1024)
    p.add_argument("--truncated", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    torch.manual_seed(a.seed)
    rng = random.Random(a.seed)
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=a.max_len + 8)
    student, teacher = LlamaForCausalLM(cfg), LlamaForCausalLM(cfg).eval()
    n_micro = a.processes * a.accumulation
    lens = lengths_of_step(n_micro * a.micro, a.min_len, a.max_len, a.truncated, rng)
    micro_batches = [lens[i * a.micro:(i + 1) * a.micro] for i in range(n_micro)]
    total = sum(lens)
    params = [q for q in student.parameters() if q.requires_grad]
    grads = {"ours": [torch.zeros_like(q) for q in params], "official": [torch.zeros_like(q) for q in params]}
    for mb in micro_batches:
        per_token = []
        for n in mb:  # one sequence at a time: no padding to get wrong
            ids = torch.randint(0, cfg.vocab_size, (1, n + 1))
            with torch.no_grad():
                t = teacher(ids).logits[0, :-1]
            s = student(ids).logits[0, :-1]
            per_token.append(L.clipped_forward_kl(s, t, 1.1, 0.05))
        kl = torch.cat(per_token)
        g_sum = torch.autograd.grad(kl.sum(), params)
        for acc, g in zip(grads["ours"], g_sum):
            acc += g / total                       # global token mean of the step
        for acc, g in zip(grads["official"], g_sum):
            acc += g / (len(kl) * n_micro)         # token mean of the micro-batch, mean over micro-batches
    ours, official = (torch.cat([g.flatten() for g in grads[k]]) for k in ("ours", "official"))
    factor = [total / (n_micro * sum(mb)) for mb in micro_batches]
    cos = torch.nn.functional.cosine_similarity(ours, official, dim=0).item()
    rel = ((official - ours).norm() / ours.norm()).item()
    print(f"layout: {a.processes} processes x {a.micro} per micro-batch x {a.accumulation} accumulation = "
          f"{len(lens)} rollouts, {total} completion tokens; micro-batch tokens {min(map(sum, micro_batches))}.."
          f"{max(map(sum, micro_batches))}")
    print(f"per-token weight of the official reduction relative to ours: {min(factor):.3f}..{max(factor):.3f}")
    print(f"gradient: cosine {cos:.4f}, |official - ours| / |ours| = {rel:.3f}, "
          f"|official| / |ours| = {(official.norm() / ours.norm()).item():.3f}")
    return {"cosine": cos, "relative_difference": rel, "factor": (min(factor), max(factor))}


if __name__ == "__main__":
    main()
