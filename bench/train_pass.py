"""Train-pass throughput, packed vs right-padded: teacher forward + student forward + loss + backward.

The pass of train.py's inner loop on micro-batches of real demo prompts (student prompt / teacher prompt
with the reference solution) and completions with a realistic length spread: lengths log-uniform in
[--min_len, --max_new_tokens] (evenly spaced quantiles, shuffled), a share --truncated of them at the
limit (rollouts that never stopped). Completion token ids are random (the cost does not depend on them). Model: the demo's LoRA
policy (r 16, all linear layers) in float32; loss: PW-OPSD's chunked clipped forward KL with position
weights and per-sequence mean, as in train.py.

Both modes run the same micro-batches, alternating packed / padded per repetition so load changes hit
both alike; "tokens" are completion tokens (what the loss trains on) and "real tokens" all non-padding
tokens of the two passes. The losses of the two modes must agree (printed).

    python bench/train_pass.py                                # 2 micro-batches x 4, completions 16..512
    python bench/train_pass.py --max_new_tokens 1024 --micro 2 --reps 1

Time on a shared CPU: use the CPU-time columns (this process's CPU seconds), run with one thread
(OMP_NUM_THREADS=1); wall time is printed too.
"""
from __future__ import annotations

import argparse
import os
import math
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dataset", default="demo-arithmetic")
    p.add_argument("--micro", type=int, default=4, help="sequences per micro-batch (demo: per_device_train_batch_size 4)")
    p.add_argument("--micro_batches", type=int, default=2)
    p.add_argument("--min_len", type=int, default=16)
    p.add_argument("--max_new_tokens", type=int, default=512)
    p.add_argument("--truncated", type=float, default=0.15, help="share of completions at --max_new_tokens")
    p.add_argument("--reps", type=int, default=2, help="timed repetitions per mode (after one warm-up)")
    p.add_argument("--modes", nargs="+", default=["packed", "padded"], choices=["packed", "padded"])
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if a.min_len < 1 or a.max_new_tokens < a.min_len:
        sys.exit("--min_len must be >= 1 and <= --max_new_tokens")

    import loss as L
    from pwopsd.fused import chunked_clipped_fkl
    from data import load_problems, resolve_model
    from peft import LoraConfig, get_peft_model
    from rollout import encode, student_prompt
    from teacher import completion_hidden_states, lm_head_weight, teacher_mode, teacher_prompt
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(a.model)
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(a.seed)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, task_type="CAUSAL_LM", target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    model.train()
    W = lm_head_weight(model)
    n = a.micro * a.micro_batches
    problems = load_problems(a.dataset, limit=n)
    rng = random.Random(a.seed)
    # Evenly spaced quantiles of the log-uniform (not random draws): every run, however small, has the
    # same spread; then shuffled into micro-batches.
    n_cut = round(a.truncated * n)
    lengths = [a.max_new_tokens] * n_cut + [
        round(math.exp(math.log(a.min_len) + (i + 0.5) / (n - n_cut) * math.log(a.max_new_tokens / a.min_len)))
        for i in range(n - n_cut)]
    rng.shuffle(lengths)
    items = [dict(student=encode(tok, student_prompt(tok, r["problem"])),
                  teacher=encode(tok, teacher_prompt(tok, r["problem"], r["solution"])),
                  completion=[rng.randrange(len(tok)) for _ in range(length)])
             for r, length in zip(problems, lengths)]
    micro_batches = [items[m:m + a.micro] for m in range(0, n, a.micro)]
    total_seqs = float(n)
    completion_tokens = sum(lengths)
    real_tokens = sum(len(it["student"]) + len(it["teacher"]) + 2 * len(it["completion"]) for it in items)
    padded_tokens = sum(len(mb) * (max(len(it["student"]) + len(it["completion"]) for it in mb)
                                   + max(len(it["teacher"]) + len(it["completion"]) for it in mb)) for mb in micro_batches)

    def train_pass(packed: bool) -> float:
        """One optimizer step's teacher + student passes and backward; returns the step loss."""
        step_loss = 0.0
        for mb in micro_batches:
            comps = [it["completion"] for it in mb]
            lens = torch.tensor([len(c) for c in comps])
            coef = L.token_coefficients(lens, L.position_weights(lens), "sequence", completion_tokens, total_seqs)
            with teacher_mode(model) as teacher:
                h_t = completion_hidden_states(teacher, [it["teacher"] for it in mb], comps, tok.pad_token_id, packed=packed)
            h_s = completion_hidden_states(model, [it["student"] for it in mb], comps, tok.pad_token_id, packed=packed)
            loss, _ = chunked_clipped_fkl(h_s, h_t, W, W, coef)
            loss.backward()
            step_loss += loss.item()
        return step_loss

    times = {m: [] for m in a.modes}
    losses = {}
    for m in a.modes:  # warm-up (allocator, kernels)
        losses[m] = train_pass(m == "packed")
        model.zero_grad(set_to_none=True)
    for _ in range(a.reps):
        for m in a.modes:
            t0, c0 = time.perf_counter(), time.process_time()
            train_pass(m == "packed")
            times[m].append((time.perf_counter() - t0, time.process_time() - c0))
            model.zero_grad(set_to_none=True)

    print(f"\n{a.model} + LoRA r16, fp32, torch threads {torch.get_num_threads()}, 1-min load {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs; {a.micro_batches} micro-batches x {a.micro}; completions {min(lengths)}..{max(lengths)} "
          f"(mean {completion_tokens / n:.0f}), student prompts mean {sum(len(i['student']) for i in items) / n:.0f}, "
          f"teacher prompts mean {sum(len(i['teacher']) for i in items) / n:.0f} tokens")
    print(f"real tokens {real_tokens} (both passes); the padded batches hold {padded_tokens} "
          f"({100 * (1 - real_tokens / padded_tokens):.0f} % padding)")
    print(f"{'mode':<7} {'loss':>12} {'best wall s':>11} {'tok/s':>7} {'best cpu s':>10} {'tok/cpu-s':>9} {'real tok/cpu-s':>14}")
    best = {}
    for m in a.modes:
        wall, cpu = min(t[0] for t in times[m]), min(t[1] for t in times[m])
        best[m] = (wall, cpu)
        print(f"{m:<7} {losses[m]:>12.6f} {wall:>11.1f} {completion_tokens / wall:>7.1f} {cpu:>10.1f} "
              f"{completion_tokens / cpu:>9.1f} {real_tokens / cpu:>14.1f}")
    if len(best) == 2:
        print(f"packed / padded train-pass throughput: {best['padded'][1] / best['packed'][1]:.2f}x CPU time, "
              f"{best['padded'][0] / best['packed'][0]:.2f}x wall; |loss difference| "
              f"{abs(losses['packed'] - losses['padded']):.2e}")


if __name__ == "__main__":
    main()
