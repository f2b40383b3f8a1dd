"""CPU mini-reproduction: does on-policy self-distillation improve a small model on held-out problems?

    python bench/mini_repro.py                 # the default comparison (see --help for its size)
    python bench/mini_repro.py --quick         # smoke test: 2 steps, 16 held-out problems, one seed
    python bench/mini_repro.py --run NAME --seed 0 -- --method opsd --clip 0   # one study run (any train.py flags)
    (flags after ``--`` go to train.py: with --run for that run, otherwise appended to every row's)

Rows (every training run is train.py itself, in a subprocess, with an ``on_step`` hook that measures the
current policy's held-out greedy accuracy through the run's own rollout engine):
  * ``base``   -- SmolLM2-135M-Instruct (``--base``) as it is: step 0 of the sft runs;
  * ``sft``    -- the warm-start recipe (configs/warmstart-demo.yaml: LoRA SFT on the reference solutions,
                  train.py's ``sft`` row) from the base model, one run per seed;
  * ``opsd`` / ``pwopsd`` / ``pwopsd-total`` -- from the cached warm start (``--model``, seed 0 of that
                  recipe; the teacher is that warm start), the paper's clip and the non-inverting
                  ``--clip_mode total`` variant, settings from configs/mini-repro.yaml, ``--steps`` 5.
Held-out accuracy = fraction of ``--heldout`` problems of ``demo-arithmetic-test`` answered correctly at
temperature 0 with the student prompt, ``--max_new_tokens`` new tokens (evaluate.greedy_correct). Reported:
mean +- std over seeds of the final accuracy, a 95 % bootstrap CI over problems (resampling problems, each
resample averaged over the seeds), the same for the first ``--gsm8k_limit`` GSM8K test problems (out of
distribution; skipped with a note when the file is absent), a markdown table (``table.md``) and one PNG of
held-out accuracy vs step, a line per method (``accuracy_vs_step.png``).

Order: first each start model once (``--eval_only``: student and teacher prompt, GSM8K; this is every run's
step 0), then the training runs, ``--jobs`` at a time (each its own process with its share of the cores).
Every finished run is one JSON file in ``<output_dir>/runs/`` and one line appended to ``--log`` (command, seed,
before, after); a rerun skips runs whose file exists, so an interrupted comparison resumes where it stopped.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GSM8K = ROOT.parent / "shared" / "data" / "gsm8k" / "test.jsonl"
LOG_LOCK = threading.Lock()  # runs finish in worker threads (--jobs); one appends to --log at a time
# row -> (config, extra train.py flags); "@base" / "@warm" are replaced by --base / --model.
ROWS = {
    "sft": ("configs/warmstart-demo.yaml", ["--model", "@base", "--rollout_backend", "auto"]),
    "opsd": ("configs/mini-repro.yaml", ["--model", "@warm", "--method", "opsd"]),
    "pwopsd": ("configs/mini-repro.yaml", ["--model", "@warm", "--method", "pwopsd"]),
    "pwopsd-total": ("configs/mini-repro.yaml", ["--model", "@warm", "--method", "pwopsd", "--clip_mode", "total"]),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("--quick", action="store_true", help="smoke test: 2 steps, 16 held-out problems, seed 0, no GSM8K")
    p.add_argument("--rows", nargs="+", default=list(ROWS), help=f"training rows ({', '.join(ROWS)}); base comes with sft")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--model", default="smollm2-135m-warm", help="warm start of the distillation rows")
    p.add_argument("--base", default="smollm2-135m", help="base model of the sft row")
    p.add_argument("--steps", type=int, default=5, help="optimizer steps of the distillation rows (the study's 5; "
                   "configs/mini-repro.yaml says 10; 0 = the config's)")
    p.add_argument("--sft_steps", type=int, default=None, help="optimizer steps of the sft row (default: its recipe's)")
    p.add_argument("--eval_every", type=int, default=None, help="also evaluate every N steps (default: only step 0 "
                   "and the last step; each evaluation of 200 problems costs ~2-3 CPU-minutes)")
    p.add_argument("--jobs", type=int, default=2, help="training runs at a time, each a process with "
                   "OMP_NUM_THREADS = cores / jobs unless set (--run: one run, all cores)")
    p.add_argument("--heldout", type=int, default=200, help="held-out demo-arithmetic-test problems")
    p.add_argument("--max_new_tokens", type=int, default=128, help="of the held-out / GSM8K greedy answers")
    p.add_argument("--gsm8k", default=str(GSM8K), help="GSM8K test.jsonl (skipped with a note when absent)")
    p.add_argument("--gsm8k_limit", type=int, default=200)
    p.add_argument("--gsm8k_seeds", type=int, nargs="*", default=[0], help="seeds whose final model is also run on "
                   "GSM8K (default: 0; no value = all)")
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--output_dir", default="outputs/mini_repro")
    p.add_argument("--log", default="docs/study_runs.jsonl", help="one line per finished run is appended here")
    p.add_argument("--run", default=None, help="run ONE setting named NAME (train.py flags after --) and log it")
    p.add_argument("--seed", type=int, default=0, help="with --run")
    p.add_argument("--config", default="configs/mini-repro.yaml", help="with --run: the base config")
    p.add_argument("--eval_only", nargs="+", default=None, metavar="MODEL",
                   help="only measure these models' held-out greedy accuracy, with the student and the teacher prompt")
    p.add_argument("--rollout_backend", default=None, choices=("auto", "vllm", "hf"),
                   help="override every run's train.py --rollout_backend (hf: no vLLM)")
    p.add_argument("--rollout_temperature", type=float, default=None,
                   help="override every run's train.py --rollout_temperature (the sft row samples nothing)")
    p.add_argument("--clip_inversion", action="store_true", help="measure, in every training run, each step's "
                   "clipped teacher top-1 tokens and their change of log p_S (bench/clip_inversion.py; "
                   "runs/NAME-sSEED.clip.jsonl)")
    p.add_argument("--report_only", action="store_true", help="train nothing: table and plot from the runs already in "
                   "--output_dir (missing ones listed); base / sft fall back to the --eval_only results of --base / --model")
    p.add_argument("--study_table", action="store_true", help="print --log as a markdown table (every run, by setting)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one training run, JSON spec
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    a = p.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    a.train_flags = extra + (["--rollout_backend", a.rollout_backend] if a.rollout_backend else []) + \
        (["--rollout_temperature", str(a.rollout_temperature)] if a.rollout_temperature is not None else [])
    unknown = [r for r in a.rows if r not in ROWS]
    if unknown:
        p.error(f"--rows: unknown {unknown} ({', '.join(ROWS)})")
    if a.jobs < 1:
        p.error("--jobs: must be >= 1")
    a.gsm8k_seeds = a.gsm8k_seeds or None  # `--gsm8k_seeds` with no value: every seed
    if a.quick:
        a.seeds, a.steps, a.sft_steps, a.eval_every, a.heldout, a.gsm8k_limit = a.seeds[:1], 2, 2, 1, 16, 0
    return a


# --------------------------------------------------------------------------------------------------
# One training run (subprocess): train.main with an on_step hook that evaluates held-out accuracy
# --------------------------------------------------------------------------------------------------
def worker(spec: dict):
    """Run train.py with ``spec["argv"]``; evaluate at ``spec["eval_steps"]``; write ``spec["result"]`` (JSON)."""
    os.chdir(ROOT)
    import torch  # noqa: F401  (before vLLM, as train.py does)

    import evaluate
    import train
    from data import load_problems

    heldout = load_problems(spec["heldout_source"], limit=spec["heldout"])
    gsm8k = load_problems(spec["gsm8k"], require_solution=False, require_answer=True, limit=spec["gsm8k_limit"],
                          verbose=False) if spec.get("gsm8k") else None
    res = {"curve": {}, "final_correct": None, "gsm8k_correct": None, "eval_s": 0.0}

    # The policy at step 0 is the start model whatever the run: its greedy accuracy is measured once and reused.
    cache = Path(spec["before_cache"])
    cached = json.loads(cache.read_text()) if cache.is_file() else None

    def on_step(run, step):
        if step not in spec["eval_steps"]:
            return
        if step == 0 and cached is not None:
            res["curve"]["0"], res["before_correct"] = sum(cached) / len(cached), cached
            return
        t0 = time.time()
        kw = dict(max_new_tokens=spec["max_new_tokens"])  # the run's own engine holds the current policy
        correct = evaluate.greedy_correct(run.engine, heldout, **kw)
        res["curve"][str(step)] = sum(correct) / len(correct)
        if step == 0:
            res["before_correct"] = correct
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(correct))
        if step == run.args.max_steps:
            res["final_correct"] = correct
            if gsm8k:
                res["gsm8k_correct"] = evaluate.greedy_correct(run.engine, gsm8k, **kw)
        res["eval_s"] += time.time() - t0
        print(f"[mini_repro] {spec['name']} step {step}: held-out {res['curve'][str(step)]:.3f} "
              f"({len(correct)} problems, {time.time() - t0:.0f} s)", flush=True)

    t0 = time.time()
    if spec.get("clip_inversion"):  # the same run, with the per-step clipped-top-1 measurement hooked in
        import clip_inversion

        Path(spec["clip_inversion"]).unlink(missing_ok=True)  # a result file is missing: the run starts over
        clip_inversion.measure(spec["argv"], out=spec["clip_inversion"], on_step=on_step)
        out_dir = train.parse_args(spec["argv"]).output_dir
    else:
        out_dir = train.main(spec["argv"], on_step=on_step)
    res["wall_s"] = time.time() - t0
    metrics = [json.loads(l) for l in open(Path(out_dir) / "metrics.jsonl")]
    res["train"] = [{k: m.get(k) for k in ("step", "loss", "correct", "boxed", "response_length", "step_s")} for m in metrics]
    Path(spec["result"]).write_text(json.dumps(res))


def run_one(name: str, seed: int, config: str, flags: list[str], a, eval_steps: list[int], gsm8k: bool) -> dict:
    """Run (or reuse) one training run in a subprocess; returns its result dict (and logs it once)."""
    out = Path(a.output_dir)
    result = out / "runs" / f"{name}-s{seed}.json"
    if result.is_file():
        return json.loads(result.read_text())
    result.parent.mkdir(parents=True, exist_ok=True)
    # No result file yet: whatever an interrupted attempt left in the run's folder is incomplete; start it over.
    argv = ["--config", config, *flags, "--seed", str(seed), "--output_dir", str(out / "train" / f"{name}-s{seed}"),
            "--save_steps", "100000", "--overwrite_output_dir", "true"]
    steps = int(next((argv[i + 1] for i in range(len(argv) - 1, -1, -1) if argv[i] == "--max_steps"), 0) or
                __import__("yaml").safe_load(open(ROOT / config))["max_steps"])
    start = next(argv[i + 1] for i in range(len(argv) - 1, -1, -1) if argv[i] == "--model") if "--model" in argv else \
        __import__("yaml").safe_load(open(ROOT / config))["model"]
    source = heldout_source(argv, config)
    spec = {"name": name, "argv": argv, "before_cache": str(before_cache(a, start, source)), "eval_steps": sorted({0, steps, *eval_steps}),
            "heldout": a.heldout, "heldout_source": source, "max_new_tokens": a.max_new_tokens, "result": str(result),
            "gsm8k": a.gsm8k if gsm8k else None, "gsm8k_limit": a.gsm8k_limit,
            "clip_inversion": str(result.with_suffix(".clip.jsonl")) if a.clip_inversion and name != "sft" else None}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    print(f"[mini_repro] {name} seed {seed}: python train.py {' '.join(argv)}", flush=True)
    t0 = time.time()
    finish(*spawn(cmd, out / "train" / f"{name}-s{seed}.log", a), f"{name} seed {seed}")
    res = json.loads(result.read_text())
    curve = res["curve"]
    line = {"date": time.strftime("%Y-%m-%d %H:%M"), "name": name, "seed": seed,
            "command": "python train.py " + " ".join(argv), "heldout": a.heldout, "max_new_tokens": a.max_new_tokens,
            "before": curve.get("0"), "after": curve.get(str(steps)), "curve": curve,
            "train_correct": [m["correct"] for m in res["train"]], "loss": [m["loss"] for m in res["train"]],
            "gsm8k": None if not res.get("gsm8k_correct") else sum(res["gsm8k_correct"]) / len(res["gsm8k_correct"]),
            "wall_s": round(time.time() - t0), "load_avg": os.getloadavg()[0]}
    if spec["clip_inversion"]:  # per step: fraction of tokens whose teacher top-1 is clipped, and its Δ log p_S
        recs = [json.loads(l) for l in open(spec["clip_inversion"])]
        line["clip_inversion"] = {k: [r[k] for r in recs] for k in ("clipped_tokens", "tokens", "dlogp_clipped",
                                                                     "dlogp_unclipped", "fell_clipped")}
    append_log(a, line)
    print(f"[mini_repro] {name} seed {seed}: held-out {line['before']} -> {line['after']} ({line['wall_s']} s)", flush=True)
    return res


def spawn(cmd: list[str], log: Path, a) -> tuple[subprocess.Popen, Path]:
    """Start ``cmd`` (one of this script's own subprocesses) with its output in ``log`` and its share of the cores."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=job_env(a)), log


def finish(proc: subprocess.Popen, log: Path, what: str):
    """Wait for a ``spawn``ed process; a failure stops the comparison with the end of its log."""
    if proc.wait() != 0:
        tail = "\n".join(log.read_text().splitlines()[-20:])
        raise SystemExit(f"[mini_repro] {what} failed (log {log}):\n{tail}")


def job_env(a) -> dict:
    """A run's environment: with ``--jobs`` runs side by side, each gets its share of the cores (torch and vLLM
    would otherwise each start one thread per core and the runs would fight over them)."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // a.jobs)))
    return env


def append_log(a, line: dict):
    if a.log:
        Path(a.log).parent.mkdir(parents=True, exist_ok=True)
        with LOG_LOCK, open(a.log, "a") as f:
            f.write(json.dumps(line) + "\n")


def eval_file(a, model: str, source: str = "demo-arithmetic-test") -> Path:
    """Where ``--eval_only`` keeps a model's per-problem results (student / teacher prompt, GSM8K)."""
    return before_cache(a, model, source).with_suffix(".eval.json")


def evaluate_start_models(a, gsm8k_ok: bool):
    """Step 0 of every run is its start model (``--base`` for sft, ``--model`` for the others): measure each once,
    before the runs and side by side (``--eval_only`` in a subprocess: student and teacher prompt, GSM8K), so that
    runs started together do not each measure it and the table has both start models' rows."""
    starts = ([a.base] if "sft" in a.rows else []) + ([a.model] if any(r != "sft" for r in a.rows) else [])
    procs = []
    for m in dict.fromkeys(starts):
        if eval_file(a, m).is_file():
            continue
        cmd = [sys.executable, str(Path(__file__).resolve()), "--eval_only", m, "--heldout", str(a.heldout),
               "--max_new_tokens", str(a.max_new_tokens), "--gsm8k", a.gsm8k,
               "--gsm8k_limit", str(a.gsm8k_limit if gsm8k_ok else 0), "--output_dir", a.output_dir,
               "--log", a.log or "", "--jobs", str(a.jobs)] + (["--rollout_backend", a.rollout_backend] if a.rollout_backend else [])
        print(f"[mini_repro] start model {m}: held-out (student and teacher prompt){' and GSM8K' if gsm8k_ok else ''}", flush=True)
        procs.append((m, spawn(cmd, Path(a.output_dir) / "train" / f"eval-{eval_file(a, m).name.split('.')[0]}.log", a)))
    for m, (proc, log) in procs:
        finish(proc, log, f"evaluating {m}")


def start_row(a, model: str) -> dict | None:
    """A start model's table row from its ``--eval_only`` results (or, from older runs, its step-0 cache)."""
    f, c = eval_file(a, model), before_cache(a, model, "demo-arithmetic-test")
    if f.is_file():
        e = json.loads(f.read_text())
        return {"final_correct": e["student"], "gsm8k_correct": e.get("gsm8k"), "teacher_correct": e["teacher"]}
    return {"final_correct": json.loads(c.read_text()), "gsm8k_correct": None} if c.is_file() else None


def before_cache(a, model: str, source: str) -> Path:
    """Where the start model's per-problem greedy correctness is kept (it does not depend on the run)."""
    import hashlib

    key = f"{model}|{source}|{a.heldout}|{a.max_new_tokens}"
    return Path(a.output_dir) / "before" / (hashlib.sha256(key.encode()).hexdigest()[:12] + ".json")


def heldout_source(argv: list[str], config: str) -> str:
    """The held-out split that matches the run's training set (demo-arithmetic[-flat] -> ...-test)."""
    import yaml

    ds = next((argv[i + 1] for i in range(len(argv) - 1, -1, -1) if argv[i] == "--dataset"), None) or \
        yaml.safe_load(open(ROOT / config)).get("dataset", "demo-arithmetic")
    return ds + "-test" if ds.startswith("demo-arithmetic") and not ds.endswith("-test") else "demo-arithmetic-test"


def eval_only(a):
    """Held-out greedy accuracy of each model with the student prompt and with the privileged teacher prompt
    (problem + reference solution): how well the model solves, and how well it reads a reference."""
    import evaluate
    import pwopsd.engine as engines
    from data import load_problems, resolve_model

    out = {}
    for name in a.eval_only:
        source = next((f"demo-arithmetic{s}-test" for s in ("-flat", "-long") if name.endswith(s)), "demo-arithmetic-test")
        problems = load_problems(source, limit=a.heldout)
        path = resolve_model(name)
        t0 = time.time()
        engine = engines.make_engine(a.rollout_backend or "auto", path, max_model_len=512 + a.max_new_tokens, seed=0,
                               gpu_memory_utilization=0.3)
        res = {p: evaluate.greedy_correct(engine, problems, max_new_tokens=a.max_new_tokens, prompt=p)
               for p in ("student", "teacher")}
        gsm8k = None
        if a.gsm8k_limit > 0 and Path(a.gsm8k).is_file():
            g = load_problems(a.gsm8k, require_solution=False, require_answer=True, limit=a.gsm8k_limit, verbose=False)
            gsm8k = evaluate.greedy_correct(engine, g, max_new_tokens=a.max_new_tokens)
        engines.close(engine)
        out[name] = {p: sum(c) / len(c) for p, c in res.items()}
        cache = before_cache(a, name, source)  # the student-prompt result is every run's step 0 from this model
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(res["student"]))
        eval_file(a, name, source).write_text(json.dumps({**res, "gsm8k": gsm8k}))
        line = {"date": time.strftime("%Y-%m-%d %H:%M"), "name": f"eval:{name}", "heldout": a.heldout, "source": source,
                "max_new_tokens": a.max_new_tokens, "student_prompt": out[name]["student"],
                "teacher_prompt": out[name]["teacher"], "gsm8k": None if gsm8k is None else sum(gsm8k) / len(gsm8k),
                "gsm8k_limit": a.gsm8k_limit if gsm8k is not None else 0, "wall_s": round(time.time() - t0), "load_avg": os.getloadavg()[0]}
        print(json.dumps(line), flush=True)
        append_log(a, line)
    return out


# --------------------------------------------------------------------------------------------------
# Statistics, table, plot
# --------------------------------------------------------------------------------------------------
def bootstrap_ci(per_seed: list[list[bool]], n: int, seed: int = 0) -> list[float]:
    """95 % percentile CI of the seed-averaged accuracy over ``n`` resamples of the problems
    (``per_seed``: ``[seeds][problems]`` correctness on the same problems)."""
    import numpy as np

    x = np.array(per_seed, dtype=float).mean(0)  # [problems], averaged over seeds
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n, len(x)))].mean(1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def paired_ci(after: list[list[bool]], before: list[bool], n: int, seed: int = 0) -> list[float]:
    """Paired bootstrap of the change on the same problems: ``[delta, lo, hi]``, delta = mean over problems of
    (``after`` averaged over seeds - ``before``), CI = 95 % percentile interval over ``n`` resamples of the problems
    (``after``: ``[seeds][problems]``; ``before``: ``[problems]``, e.g. the start model or another row)."""
    import numpy as np

    d = np.array(after, dtype=float).mean(0) - np.array(before, dtype=float)
    if d.ndim != 1:
        raise ValueError(f"paired_ci: before has shape {np.shape(before)}, not [problems] ({len(d)})")
    means = d[np.random.default_rng(seed).integers(0, len(d), size=(n, len(d)))].mean(1)
    return [float(d.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def row_differences(rows: dict, a) -> list[str]:
    """Every pair of training rows from the same start model, on the same problems: ``"B - A: +d (lo..hi)"``
    (paired bootstrap of the seed-averaged final correctness, ``paired_ci``)."""
    import numpy as np

    trained = {n: r for n, r in rows.items() if all(x.get("before_correct") for x in r)}
    out = []
    for i, (na, ra) in enumerate(trained.items()):
        for nb, rb in list(trained.items())[i + 1:]:
            if ra[0]["before_correct"] != rb[0]["before_correct"]:
                continue  # different start models (sft vs the distillation rows)
            base = np.array([x["final_correct"] for x in ra], dtype=float).mean(0)
            d, lo, hi = paired_ci([x["final_correct"] for x in rb], base, a.bootstrap)
            out.append(f"{nb} - {na}: {d:+.3f} ({lo:+.3f}..{hi:+.3f})")
    return out


def clip_summary(a) -> list[str]:
    """The ``--clip_inversion`` measurements of every run in ``<output_dir>/runs`` as markdown rows: steps, the
    share of completion tokens whose teacher top-1 is clipped, and the change of log p_S(v*) (nats, token-weighted
    over all steps) on those tokens and on the others, with the share of clipped tokens whose log p_S(v*) fell."""
    rows = []
    for f in sorted((Path(a.output_dir) / "runs").glob("*.clip.jsonl")):
        recs = [json.loads(l) for l in open(f) if l.strip()]
        if not recs:
            continue
        n = sum(r["tokens"] for r in recs)
        c = sum(r["clipped_tokens"] for r in recs)
        dc = sum(r["dlogp_clipped"] * r["clipped_tokens"] for r in recs if r["clipped_tokens"]) / c if c else None
        du = sum(r["dlogp_unclipped"] * (r["tokens"] - r["clipped_tokens"]) for r in recs
                 if r["tokens"] > r["clipped_tokens"]) / (n - c)
        fell = sum(r["fell_clipped"] * r["clipped_tokens"] for r in recs if r["clipped_tokens"]) / c if c else None
        fell_u = sum(r["fell_unclipped"] * (r["tokens"] - r["clipped_tokens"]) for r in recs
                     if r["tokens"] > r["clipped_tokens"]) / (n - c)
        fmt = (lambda v, f: "-" if v is None else format(v, f))
        rows.append(f"| {f.name.split('.')[0]} | {len(recs)} | {c} / {n} ({100 * c / n:.2f} %) | {fmt(dc, '+.4f')} | "
                    f"{fmt(fell, '.2f')} | {du:+.5f} | {fell_u:.2f} |")
    if not rows:
        return []
    return ["| run | steps | tokens with the teacher top-1 clipped | Δ log p_S(v*), clipped (nats/step) | "
            "fell, clipped | Δ log p_S(v*), other tokens | fell, other |", "|---|---|---|---|---|---|---|", *rows]


def summarize(rows: dict, a) -> dict:
    """rows: name -> [result per seed] -> {name: {mean, std, ci, per_seed, gsm8k...}}."""
    import statistics

    out = {}
    for name, results in rows.items():
        finals = [r["final_correct"] for r in results]
        accs = [sum(c) / len(c) for c in finals]
        block = {"seeds": len(results), "per_seed": accs, "mean": statistics.fmean(accs),
                 "std": statistics.stdev(accs) if len(accs) > 1 else 0.0, "ci": bootstrap_ci(finals, a.bootstrap)}
        if all(r.get("before_correct") for r in results):  # a training run: its change from its start model
            block["paired"] = paired_ci(finals, results[0]["before_correct"], a.bootstrap)
        if results[0].get("teacher_correct"):  # a start model: also the privileged teacher prompt
            block["teacher"] = sum(results[0]["teacher_correct"]) / len(results[0]["teacher_correct"])
        g = [r["gsm8k_correct"] for r in results if r.get("gsm8k_correct")]
        if g:
            ga = [sum(c) / len(c) for c in g]
            block.update(gsm8k_mean=statistics.fmean(ga), gsm8k_std=statistics.stdev(ga) if len(ga) > 1 else 0.0,
                         gsm8k_seeds=len(ga), gsm8k_ci=bootstrap_ci(g, a.bootstrap))
        out[name] = block
    return out


def markdown(summary: dict, a, gsm8k_note: str) -> str:
    head = (f"| method | seeds | held-out acc. ({a.heldout}, greedy), mean ± std | 95 % bootstrap CI | "
            f"change from its start, paired 95 % CI | per seed | GSM8K ({a.gsm8k_limit}) |")
    lines = [head, "|---|---|---|---|---|---|---|"]
    for name, b in summary.items():
        g = f"{b['gsm8k_mean']:.3f} ± {b['gsm8k_std']:.3f} ({b['gsm8k_seeds']} seed(s), CI {b['gsm8k_ci'][0]:.3f}-{b['gsm8k_ci'][1]:.3f})" \
            if "gsm8k_mean" in b else gsm8k_note
        d = f"{b['paired'][0]:+.3f} ({b['paired'][1]:+.3f}..{b['paired'][2]:+.3f})" if "paired" in b else "-"
        lines.append(f"| {name} | {b['seeds']} | {b['mean']:.3f} ± {b['std']:.3f} | {b['ci'][0]:.3f}-{b['ci'][1]:.3f} | "
                     f"{d} | {', '.join(f'{x:.3f}' for x in b['per_seed'])} | {g} |")
    teacher = [f"{name} {b['teacher']:.3f}" for name, b in summary.items() if "teacher" in b]
    if teacher:
        lines += ["", "The same held-out problems under the privileged teacher prompt (problem + reference solution), "
                  "greedy: " + ", ".join(teacher) + "."]
    return "\n".join(lines)


def study_table(lines: list[dict]) -> str:
    """The study log as markdown: model evaluations first, then every training run grouped by setting, with
    before / after held-out accuracy, the per-setting mean change over seeds, and the rollout correctness."""
    import statistics

    out = ["| model | held-out problems | student prompt | teacher prompt (with reference) | GSM8K |", "|---|---|---|---|---|"]
    for l in lines:
        if l["name"].startswith("eval:"):
            g = f"{l['gsm8k']:.3f} ({l['gsm8k_limit']})" if l.get("gsm8k") is not None else "-"
            t = f"{l['teacher_prompt']:.3f}" if l.get("teacher_prompt") is not None else "-"
            out.append(f"| {l['name'][5:]} | {l['heldout']} | {l['student_prompt']:.3f} | {t} | {g} |")
    out += ["", "| setting | seed | train.py flags (beyond configs/mini-repro.yaml) | before | after | Δ | curve | rollout correct (first -> last step) | wall |",
            "|---|---|---|---|---|---|---|---|---|"]
    runs = [l for l in lines if not l["name"].startswith("eval:") and "before" in l]
    other = [l for l in lines if not l["name"].startswith("eval:") and "before" not in l]  # the instruments' runs
    by = {}  # a setting = a name and its flags (the same row name run at another lr is another setting)
    for l in runs:
        by.setdefault((l["name"], l["command"].split(" --seed ")[0]), []).append(l)
    for (name, _), ls in by.items():
        for l in ls:
            flags = l["command"].split("--config ", 1)[1].split(" ", 1)[1]
            flags = flags.split(" --seed ")[0]
            curve = ", ".join(f"{k}: {v:.3f}" for k, v in sorted(l["curve"].items(), key=lambda kv: int(kv[0])))
            tc = l["train_correct"]
            out.append(f"| {name} | {l['seed']} | `{flags}` | {l['before']:.3f} | {l['after']:.3f} | {l['after'] - l['before']:+.3f} | "
                       f"{curve} | {tc[0]:.2f} -> {tc[-1]:.2f} (mean {statistics.fmean(tc):.2f}) | {l['wall_s'] / 60:.1f} min |")
        if len(ls) > 1:
            d = [l["after"] - l["before"] for l in ls]
            out.append(f"| **{name}: mean over {len(ls)} seeds** | | | | {statistics.fmean(l['after'] for l in ls):.3f} | "
                       f"**{statistics.fmean(d):+.3f} ± {statistics.stdev(d):.3f}** | | | |")
    if other:
        out += ["", "Other runs (instruments; their numbers are in docs/study.md):", ""]
        out += [f"- {l['name']} ({l['date']}): `{l['command']}`" for l in other]
    return "\n".join(out)


def plot(curves: dict, path: Path):
    """One PNG of held-out accuracy vs optimizer step, mean over seeds (band = min-max), a line per method: the
    sft rows from the base model on the left, the distillation rows from the warm start on the right (their
    step counts differ ~10x, so one axis would squash the distillation lines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels = [("sft: LoRA SFT from the base model", [n for n in curves if n in ("base", "sft")]),
              ("distillation from the warm start", [n for n in curves if n not in ("base", "sft")])]
    panels = [(t, names) for t, names in panels if names]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), dpi=110, sharey=True, squeeze=False)
    for ax, (title, names) in zip(axes[0], panels):
        for name in names:
            per_seed = curves[name]
            steps = sorted({int(s) for c in per_seed for s in c})
            vals = np.array([[c.get(str(s), np.nan) for s in steps] for c in per_seed])
            ax.plot(steps, np.nanmean(vals, 0), marker="o", ms=3, label=f"{name} ({len(per_seed)} seed(s))")
            if len(per_seed) > 1:
                ax.fill_between(steps, np.nanmin(vals, 0), np.nanmax(vals, 0), alpha=0.15)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("held-out greedy accuracy")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plan_runs(a, gsm8k_ok: bool) -> list[tuple]:
    """Every training run of the comparison: ``(row, seed, config, train.py flags, evaluation steps, GSM8K at
    the end)``, rows in ``--rows`` order, seeds within."""
    plan = []
    for row in a.rows:
        config, flags = ROWS[row]
        flags = [x.replace("@warm", a.model).replace("@base", a.base) for x in flags] + a.train_flags
        steps = a.sft_steps if row == "sft" else a.steps
        if steps:
            flags += ["--max_steps", str(steps)]
        steps = steps or __import__("yaml").safe_load(open(ROOT / config))["max_steps"]
        evals = list(range(a.eval_every, steps + 1, a.eval_every)) if a.eval_every else []
        plan += [(row, seed, config, flags, evals, gsm8k_ok and (a.gsm8k_seeds is None or seed in a.gsm8k_seeds))
                 for seed in a.seeds]
    return plan


WARM_ROW = "warm start (start of the distillation rows)"


def table_rows(a, done: dict) -> tuple[dict, dict]:
    """``(rows, curves)``: name -> [result per seed] and name -> [curve per seed], in table order: base (before
    sft), sft, the warm start (before the first distillation row), then the distillation rows."""
    rows, curves = {}, {}
    for row in a.rows:
        results = [done[row, s] for s in a.seeds if (row, s) in done]
        if row == "sft":
            base = start_row(a, a.base) or ({"final_correct": results[0]["before_correct"], "gsm8k_correct": None}
                                            if results else None)
            if base:
                rows["base"] = [base]
                curves["base"] = [{"0": sum(base["final_correct"]) / len(base["final_correct"])}]
        elif WARM_ROW not in rows and (warm := start_row(a, a.model)):
            rows[WARM_ROW] = [warm]
        if results:
            rows[row] = results
            curves[row] = [r["curve"] for r in results]
    return rows, curves


def main(argv=None):
    a = parse_args(argv)
    if a.worker:
        return worker(json.loads(a.worker))
    os.chdir(ROOT)
    if a.study_table:
        print(study_table([json.loads(l) for l in open(a.log) if l.strip()]))
        return None
    if a.eval_only:
        return eval_only(a)
    if a.run:  # one study setting
        a.jobs = 1  # one run: all the cores (job_env)
        flags = [x.replace("@warm", a.model).replace("@base", a.base) for x in a.train_flags]
        steps = next((int(flags[i + 1]) for i in range(len(flags) - 1, -1, -1) if flags[i] == "--max_steps"), None) or \
            __import__("yaml").safe_load(open(ROOT / a.config))["max_steps"]
        evals = list(range(a.eval_every, steps + 1, a.eval_every)) if a.eval_every else []
        gs = a.gsm8k_limit > 0 and Path(a.gsm8k).is_file() and (a.gsm8k_seeds is None or a.seed in a.gsm8k_seeds)
        res = run_one(a.run, a.seed, a.config, flags, a, evals, gsm8k=gs)
        print(json.dumps(res["curve"]))
        return res
    t0 = time.time()
    gsm8k_ok = a.gsm8k_limit > 0 and Path(a.gsm8k).is_file()
    gsm8k_note = "skipped (--gsm8k_limit 0)" if a.gsm8k_limit <= 0 else \
        ("" if gsm8k_ok else f"skipped: {a.gsm8k} not found")
    if gsm8k_note:
        print(f"[mini_repro] GSM8K {gsm8k_note}")
    plan = plan_runs(a, gsm8k_ok)
    done, missing = {}, []
    if a.report_only:
        for row, seed, *_ in plan:
            f = Path(a.output_dir) / "runs" / f"{row}-s{seed}.json"
            if f.is_file():
                done[row, seed] = json.loads(f.read_text())
            else:
                missing.append(f"{row} seed {seed}")
        if not done:
            raise SystemExit(f"mini_repro.py: --report_only: no finished runs in {Path(a.output_dir) / 'runs'}")
    else:
        evaluate_start_models(a, gsm8k_ok)
        print(f"[mini_repro] {len(plan)} training runs, {a.jobs} at a time; logs in {Path(a.output_dir) / 'train'}",
              flush=True)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(a.jobs) as pool:  # threads only wait: each run is its own process
            futures = [(row, seed, pool.submit(run_one, row, seed, config, flags, a, evals, gs))
                       for row, seed, config, flags, evals, gs in plan]
            for row, seed, fut in futures:
                done[row, seed] = fut.result()
    rows, curves = table_rows(a, done)
    summary = summarize(rows, a)
    out = Path(a.output_dir)
    table = markdown(summary, a, gsm8k_note or "not run for this row")
    pairs = row_differences(rows, a)
    if pairs:
        table += "\n\nBetween rows, paired 95 % CI over the same problems (seed-averaged): " + "; ".join(pairs) + "."
    if clip := clip_summary(a):  # --clip_inversion: the mechanism, measured in the same runs
        table += "\n\n" + "\n".join(clip)
    (out / "table.md").write_text(table + "\n")
    (out / "summary.json").write_text(json.dumps({"args": {k: v for k, v in vars(a).items() if k != "worker"},
                                                  "summary": summary, "row_differences": pairs, "curves": curves, "wall_s": time.time() - t0}, indent=1))
    plot(curves, out / "accuracy_vs_step.png")
    if missing:
        table += f"\n\nNot run (--report_only): {', '.join(missing)}."
        (out / "table.md").write_text(table + "\n")
    print(table)
    print(f"[mini_repro] {out / 'table.md'}, {out / 'accuracy_vs_step.png'} ({(time.time() - t0) / 60:.1f} min)")
    return summary


if __name__ == "__main__":
    main()
