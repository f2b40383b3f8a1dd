"""Peak memory and time of one forward+backward of the clipped forward KL, three ways, side by side.

    python bench/loss_memory.py                      # Qwen3-4B shapes: V=151,936, H=2,560, N=4x1024, fp32, CPU
    python bench/loss_memory.py --device cuda --dtype bfloat16

(a) naive:     full log-softmax of student and teacher logits [N, V], point-wise KL, clamp, sum over V
               -- the pattern of a straightforward implementation;
(b) reference: loss.clipped_forward_kl on full logits (the readable spec in loss.py);
(c) chunked:   pwopsd.fused.chunked_clipped_fkl on hidden states, --chunk tokens at a time;
(d) jsd:       loss.clipped_generalized_jsd at --beta (default 0.5) on full logits (reference path only);
(e) topk:      loss.clipped_topk_forward_kl, the teacher's top --top_k (default 20) + a tail bucket, on full logits;
(f) jsd-chunked / topk-chunked: (d) / (e) through train.py's chunked path (pwopsd.fused.checkpointed_chunks, --chunk).

    python bench/loss_memory.py --N 128 --H 256 --impls reference chunked jsd topk   # a small-memory run

Each runs in its own process, so one's allocations cannot flatter another's. "Peak above inputs" is the
peak resident memory (CPU: VmHWM after resetting it; CUDA: max_memory_allocated) minus what the inputs
(hidden states, lm_head) already hold. The student hidden states carry the gradient (LoRA case: the
lm_head is frozen).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rss_gib(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 2**20
    raise RuntimeError(field)


def worker(a):
    sys.path.insert(0, ROOT)
    import torch

    import loss as L
    from pwopsd import fused

    torch.manual_seed(0)
    dtype, dev = getattr(torch, a.dtype), torch.device(a.device)
    h_s = torch.randn(a.N, a.H, dtype=dtype, device=dev).requires_grad_()
    h_t = torch.randn(a.N, a.H, dtype=dtype, device=dev)
    W = (torch.randn(a.V, a.H, dtype=dtype, device=dev) * a.H ** -0.5)
    coef = torch.full((a.N,), 1.0 / a.N, device=dev)
    T, c = 1.1, 0.05

    def naive():
        log_p_s = torch.log_softmax((h_s @ W.T).float() / T, dim=-1)
        log_p_t = torch.log_softmax((h_t @ W.T).float() / T, dim=-1)
        pointwise = torch.exp(log_p_t) * (log_p_t - log_p_s)
        return (coef * torch.clamp(pointwise, max=c).sum(-1)).sum()

    ctx = SimpleNamespace(coef=coef)

    def hp(beta, top_k):
        return SimpleNamespace(temperature=T, clip=c, beta=beta, teacher_top_k=top_k, loss_chunk_size=a.chunk)

    fn = {"naive": naive,
          "reference": lambda: (coef * L.clipped_forward_kl(h_s @ W.T, h_t @ W.T, T, c)).sum(),
          "chunked": lambda: fused.chunked_clipped_fkl(h_s, h_t, W, W, coef, T, c, a.chunk)[0],
          "jsd": lambda: (coef * L.clipped_generalized_jsd(h_s @ W.T, h_t @ W.T, T, c, a.beta)).sum(),
          "topk": lambda: (coef * L.clipped_topk_forward_kl(h_s @ W.T, h_t @ W.T, T, c, a.top_k)).sum(),
          # the same two through train.py's chunked path (activation-checkpointed chunks of --chunk tokens)
          "jsd-chunked": lambda: L.step_loss("clipped_fkl", "chunked", h_s, h_t, W, W, ctx, hp(a.beta, 0))[0],
          "topk-chunked": lambda: L.step_loss("clipped_fkl", "chunked", h_s, h_t, W, W, ctx, hp(0.0, a.top_k))[0]}[a.worker]
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    times, value = [], None
    for i in range(a.repeats + (1 if dev.type == "cuda" else 0)):  # one warm-up on GPU
        h_s.grad = None
        if dev.type == "cuda":
            sync()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            base = _rss_gib("VmRSS")
            open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
        t0 = time.perf_counter()
        out = fn()
        out.backward()
        sync()
        times.append(time.perf_counter() - t0)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if dev.type == "cuda" else _rss_gib("VmHWM") - base
        value = out.item()
    if dev.type == "cuda" and len(times) > 1:
        times = times[1:]
    print(json.dumps({"impl": a.worker, "peak_gib": peak, "seconds": sum(times) / len(times), "loss": value,
                      "grad_norm": h_s.grad.float().norm().item()}))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--V", type=int, default=151_936)
    p.add_argument("--H", type=int, default=2_560)
    p.add_argument("--N", type=int, default=4 * 1024)
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--beta", type=float, default=0.5, help="jsd: the generalized JSD's beta")
    p.add_argument("--top_k", type=int, default=20, help="topk: teacher tokens kept")
    p.add_argument("--impls", nargs="+", default=["naive", "reference", "chunked"])
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a)
    print(f"V={a.V} H={a.H} N={a.N} chunk={a.chunk} beta={a.beta} top_k={a.top_k} {a.dtype} on {a.device}; "
          "one process per implementation")
    rows = {}
    for impl in a.impls:
        keys = ("V", "H", "N", "chunk", "dtype", "device", "repeats", "beta", "top_k")
        cmd = [sys.executable, __file__, "--worker", impl] + [x for k in keys for x in (f"--{k}", str(getattr(a, k)))]
        # A fixed mmap threshold stops glibc from keeping freed [chunk, V] buffers in the heap, where they
        # would still count as resident memory (the same setting for every implementation).
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode != 0:
            print(f"{impl}: failed (exit {r.returncode}; killed for memory?) {r.stderr.strip().splitlines()[-1:]}")
            continue
        rows[impl] = json.loads(r.stdout.strip().splitlines()[-1])
    print("| impl | peak above inputs (GiB) | s / fwd+bwd | loss | grad norm |\n|---|---|---|---|---|")
    for impl, r in rows.items():
        print(f"| {impl} | {r['peak_gib']:.2f} | {r['seconds']:.2f} | {r['loss']:.6f} | {r['grad_norm']:.6e} |")
    if "naive" in rows:
        for impl in ("reference", "chunked", "jsd", "topk", "jsd-chunked", "topk-chunked"):
            if impl in rows:
                print(f"{impl} / naive: memory {rows[impl]['peak_gib'] / rows['naive']['peak_gib']:.3f}x, "
                      f"time {rows[impl]['seconds'] / rows['naive']['seconds']:.2f}x")


if __name__ == "__main__":
    main()
