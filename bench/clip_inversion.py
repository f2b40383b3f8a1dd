"""Does the point-wise clip push a clipped teacher top-1 *down*? A per-step measurement inside a real train.py run.

    python bench/clip_inversion.py -- --config configs/mini-repro.yaml --max_steps 3      # any train.py flags after --
    python bench/clip_inversion.py --out runs/ci.jsonl -- --config configs/mini-repro.yaml --learning_rate 2e-5 \\
        --lr_scheduler_type linear --max_steps 3 --output_dir outputs/ci-2e-5

The point-wise clip (OPSD Eq. 4, ``loss.clip_kl_terms``) keeps ``min(x_v, c)`` per vocabulary entry, with
``x_v = p_T(v) (log p_T(v) - log p_S(v))`` at the loss temperature T. A clipped entry has no gradient, while the
softmax still raises the unclipped entries' student probabilities, so the teacher's most likely token v* -- the
entry most often clipped -- can be pushed down. This script runs ``train.main`` unchanged and, for every optimizer
step, on that step's own prompts and rollouts (captured by wrapping ``train.accumulate_gradients``):

  * before the step (no-grad teacher + student pass): v* = teacher argmax at each completion position, whether its
    entry is clipped (``x_{v*} > c``; c = ``--clip``, whatever ``--clip_mode`` trains), and log p_S(v*) at T;
  * after the optimizer step (``on_step``; a no-grad student pass, same tokens): log p_S(v*) again.

One jsonl line per step (``--out``; default ``<train output_dir>/clip_inversion.jsonl``) and a table at the end:
the fraction of completion tokens whose v* is clipped, and the mean change of log p_S(v*) on those tokens and on
the others (the control). Falling on the clipped tokens while rising on the others = the inversion at that update
size. Single process only (the measurement reads this process's rollouts).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import train  # noqa: E402  (after the path insert)
from pwopsd.metrics import per_rollout  # noqa: E402
from teacher import completion_hidden_states, teacher_mode  # noqa: E402

PROG = "bench/clip_inversion.py"
COLUMNS = ("step", "lr", "tokens", "clipped_frac", "dlogp_clipped", "dlogp_unclipped", "fell_clipped", "fell_unclipped")


def _student_logp(run, seqs, comps, targets, chunk):
    """log p_S(targets) at the loss temperature, no grad, eval mode (no dropout): ``[N]`` float32."""
    out = []
    for m in range(0, len(seqs), chunk):
        h = completion_hidden_states(run.model, [s["student_ids"] for s in seqs[m:m + chunk]], comps[m:m + chunk], run.pad_id)
        logp = F.log_softmax((h @ run.student_head.T).float() / run.args.temperature, dim=-1)
        n = sum(len(c) for c in comps[:m])
        out.append(logp.gather(-1, targets[n:n + len(logp)].to(logp.device)[:, None])[:, 0].cpu())
    return torch.cat(out)


def measure_before(run, batch: list[dict], rollouts: list) -> dict:
    """The step's tokens before its update: ``{"seqs", "comps", "vstar" [N] long, "x_star" [N], "clipped" [N] bool,
    "logp_before" [N]}`` (float32, nats, loss temperature ``--temperature``; clipped = ``--clip`` > 0 and
    ``x_{v*} > --clip``). The teacher is the run's own (adapter off / frozen copy / EMA adapter)."""
    args, seqs = run.args, per_rollout(batch, rollouts)
    comps = [list(r.completion_ids) for r in rollouts]
    was_training = run.model.training
    run.model.eval()
    try:
        with torch.no_grad(), run.accelerator.autocast():
            vstar, x_star, logp_s = [], [], []
            for m in range(0, len(seqs), run.micro):
                mb, cm = seqs[m:m + run.micro], comps[m:m + run.micro]
                with teacher_mode(run.model, run.frozen_teacher, run.teacher_adapter) as teacher:
                    h_t = completion_hidden_states(teacher, [s["teacher_ids"] for s in mb], cm, run.pad_id)
                h_s = completion_hidden_states(run.model, [s["student_ids"] for s in mb], cm, run.pad_id)
                lp_t = F.log_softmax((h_t @ run.teacher_head.T).float() / args.temperature, dim=-1)
                lp_s = F.log_softmax((h_s @ run.student_head.T).float() / args.temperature, dim=-1)
                top = lp_t.argmax(-1, keepdim=True)
                t_top, s_top = lp_t.gather(-1, top)[:, 0], lp_s.gather(-1, top)[:, 0]
                vstar.append(top[:, 0].cpu())
                x_star.append((t_top.exp() * (t_top - s_top)).cpu())
                logp_s.append(s_top.cpu())
    finally:
        run.model.train(was_training)
    x_star = torch.cat(x_star)
    clipped = (x_star > args.clip) if args.clip > 0 else torch.zeros_like(x_star, dtype=torch.bool)
    return {"seqs": seqs, "comps": comps, "vstar": torch.cat(vstar), "x_star": x_star, "clipped": clipped,
            "logp_before": torch.cat(logp_s)}


def measure_after(run, before: dict) -> torch.Tensor:
    """log p_S(v*) on the same tokens after the optimizer step: ``[N]`` float32 (no grad, eval mode)."""
    was_training = run.model.training
    run.model.eval()
    try:
        with torch.no_grad(), run.accelerator.autocast():
            return _student_logp(run, before["seqs"], before["comps"], before["vstar"], run.micro)
    finally:
        run.model.train(was_training)


def step_record(step: int, lr: float, before: dict, logp_after: torch.Tensor) -> dict:
    """One jsonl line: counts, the clipped fraction, mean change of log p_S(v*) (nats) on the clipped / unclipped
    tokens and the share of each whose log p_S(v*) fell (None where a class is empty)."""
    d, c = logp_after - before["logp_before"], before["clipped"]

    def mean(x):
        return None if len(x) == 0 else float(x.double().mean())

    return {"step": step, "lr": lr, "tokens": int(len(d)), "clipped_tokens": int(c.sum()),
            "clipped_frac": float(c.double().mean()), "dlogp_clipped": mean(d[c]), "dlogp_unclipped": mean(d[~c]),
            "fell_clipped": mean((d[c] < 0).double()), "fell_unclipped": mean((d[~c] < 0).double()),
            "logp_before_clipped": mean(before["logp_before"][c]), "x_star_clipped": mean(before["x_star"][c])}


def table(records: list[dict]) -> str:
    """The printed table (markdown), one row per step."""
    def fmt(v):
        return "-" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    return "\n".join(lines + ["| " + " | ".join(fmt(r[k]) for k in COLUMNS) + " |" for r in records])


def measure(train_argv: list[str], out: str | None = None, keep: bool = False, on_step=None) -> list[dict]:
    """Run ``train.main(train_argv)`` with the measurement hooked in; returns one record per optimizer step (also
    appended to ``out`` as jsonl). ``keep``: each record also holds ``"_before"`` and ``"_logp_after"`` (tests).
    ``on_step(run, step)``: the caller's own hook (e.g. bench/mini_repro.py's held-out evaluation), called after
    the step's measurement, at every step including 0."""
    settings = train.parse_args(train_argv)  # every train.py flag error, in one line, before anything loads
    header = {k: getattr(settings, k) for k in ("method", "clip_mode", "clip", "temperature", "learning_rate",
                                                 "lr_scheduler_type", "seed", "model", "dataset")}
    records, pending = [], {}
    original = train.accumulate_gradients

    def accumulate(run, batch, rollouts, step):
        if run.accelerator.num_processes > 1:
            train.fail(PROG, "single process only (the measurement reads this process's rollouts)")
        pending["lr"] = float(run.scheduler.get_last_lr()[0])  # the lr this step's update uses
        pending["before"] = measure_before(run, batch, rollouts)
        return original(run, batch, rollouts, step)

    def hook(run, step):
        measure_step(run, step)
        if on_step is not None:
            on_step(run, step)

    def measure_step(run, step):
        if "before" not in pending:  # step 0 (before training), or a resumed run's first call
            return
        before = pending.pop("before")
        after = measure_after(run, before)
        rec = {**step_record(step, pending.pop("lr"), before, after), **header}
        if out:
            with open(out, "a") as f:
                f.write(json.dumps(rec) + "\n")
        if keep:
            rec = {**rec, "_before": before, "_logp_after": after}
        records.append(rec)
        print("[clip_inversion] " + ", ".join(f"{k} {rec[k] if not isinstance(rec[k], float) else f'{rec[k]:.4g}'}"
                                               for k in COLUMNS), flush=True)

    train.accumulate_gradients = accumulate
    try:
        train.main(train_argv, on_step=hook)
    finally:
        train.accumulate_gradients = original
    return records


def main(argv=None):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--out", help="jsonl, one line per step (default <train --output_dir>/clip_inversion.jsonl)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out instead of refusing")
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    a, train_argv = p.parse_args(argv[:cut]), argv[cut + 1:]
    out = a.out or os.path.join(train.parse_args(train_argv).output_dir, "clip_inversion.jsonl")
    if os.path.exists(out) and os.path.getsize(out) and not a.overwrite:
        p.error(f"--out {out}: already holds measurements (--overwrite to replace them)")
    if os.path.exists(out):
        os.remove(out)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    records = measure(train_argv, out)
    print(table(records))
    print(f"[clip_inversion] {len(records)} steps -> {out}")


if __name__ == "__main__":
    main()
