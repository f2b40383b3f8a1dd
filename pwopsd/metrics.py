"""A training step's metrics: reduced over processes by name, printed as one line, appended to metrics.jsonl."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

def reduce_sums(acc, values: dict[str, float]) -> dict[str, float]:
    """Each named number summed over processes (one collective, float64), by name."""
    names = list(values)
    total = acc.reduce(torch.tensor([float(values[k]) for k in names], dtype=torch.float64, device=acc.device), reduction="sum")
    return dict(zip(names, total.tolist()))


def per_rollout(batch: list[dict], rollouts: list) -> list[dict]:
    """Each prompt repeated for its rollouts (``sample_rollouts`` is prompt-major): the problem of every rollout.
    The teacher / student prompts are the pre-rendered ids of that problem, so nothing is re-encoded."""
    g, rest = divmod(len(rollouts), len(batch))
    if rest or g < 1:
        raise ValueError(f"{len(rollouts)} rollouts for {len(batch)} prompts: not a whole number per prompt")
    return [b for b in batch for _ in range(g)]


def step_metrics(run, batch, rollouts, out: dict, grad_norm, times: dict, step: int) -> dict:
    """The step's metrics over all processes: loss, position weights, lengths, truncated / boxed / correct
    fractions (graded by math-verify under ``--grading``), gradient norm, lr, throughput, and the method's diagnostics."""
    from pwopsd import grading  # the grader (math-verify), for the boxed / correct rates

    acc, w = run.accelerator, out["weights"]
    texts = run.tok.batch_decode([r.completion_ids for r in rollouts], skip_special_tokens=True)
    graded = [grading.grade(t, b["answer"], truncated=r.truncated, rule=run.args.grading) if b["answer"]
              else (grading.extract_answer(t), False) for t, b, r in zip(texts, per_rollout(batch, rollouts), rollouts)]
    sums = reduce_sums(acc, {"rollouts": len(rollouts), "truncated": sum(r.truncated for r in rollouts),
                             "boxed": sum(a is not None for a, _ in graded), "correct": sum(c for _, c in graded),
                             "weight_sum": w.sum().item(), "weights": w.numel()})
    w_range = acc.gather(torch.stack([w.min(), w.max()])[None])  # [processes, 2]
    n, dt = sums["rollouts"], time.time() - times["start"]
    metrics = {"step": step + 1, "loss": out["loss"], "weight_mean": sums["weight_sum"] / sums["weights"],
               "weight_min": w_range[:, 0].min().item(), "weight_max": w_range[:, 1].max().item(),
               "response_length": out["total_tokens"] / n, "truncated": sums["truncated"] / n,
               "boxed": sums["boxed"] / n, "correct": sums["correct"] / n,
               "grad_norm": float(grad_norm) if grad_norm is not None else math.nan, "lr": run.scheduler.get_last_lr()[0],
               "tokens_per_s": out["total_tokens"] / dt, "rollout_s": times["rollout"], "sync_s": times["sync"], "step_s": dt}
    for k, v in out["stats"].items():
        metrics[k] = acc.reduce(torch.tensor(v, device=acc.device), reduction="mean").item()
    return metrics


def log_step(run, metrics: dict, bar):
    """Console line and ``metrics.jsonl`` (main process), and the tracker."""
    if run.accelerator.is_main_process:
        m = metrics
        bar.write(f"step {m['step']:4d} | loss {m['loss']:.4f} | w {m['weight_mean']:.3f} "
                  f"[{m['weight_min']:.2f},{m['weight_max']:.2f}] | len {m['response_length']:.0f} "
                  f"| trunc {m['truncated']:.2f} | boxed {m['boxed']:.2f} | correct {m['correct']:.2f} "
                  f"| gnorm {m['grad_norm']:.3f} | {m['tokens_per_s']:.0f} tok/s | {m['step_s']:.1f}s")
        with open(Path(run.args.output_dir) / "metrics.jsonl", "a") as f:
            f.write(json.dumps(metrics) + "\n")
    run.accelerator.log(metrics, step=metrics["step"])
