"""Problems: the records every stage reads, ``{"id", "problem", "solution", "answer"}``.

  * ``problem``  -- the question shown to the student (and the teacher);
  * ``solution`` -- the reference solution shown only to the privileged teacher (OPSD, Sec. 3);
  * ``answer``   -- the final answer used for grading (may be ``None`` for training-only data).

Sources: a Hub dataset id (default ``siyanzhao/Openthoughts_math_30k_opsd``), a local ``.jsonl`` / ``.json`` /
``.parquet`` file, or the offline ``demo-arithmetic`` problems (pwopsd/demo.py; ``-test`` = held out, ``-flat`` =
one-line solutions). Field names are detected among common schemas and can be forced; GSM8K's ``... #### N``
answers are split into solution and answer.

    python data.py --dataset demo-arithmetic --limit 2        # print records
    python data.py --model smollm2-135m                       # build the cached demo model, print its folder
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from pwopsd.cli import arg, load_or_exit, parse_config
from pwopsd.demo import DEMO_MODEL, DEMO_SOURCES, DEMO_TEST_SIZE, DEMO_TRAIN_SIZE, demo_arithmetic, demo_heldout, resolve_model
from pwopsd.grading import last_boxed, split_gsm8k
from pwopsd.records import _ASSISTANT, _USER, _columns, _get, _pick, _read_rows, _text, no_usable_records

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
_announced: set = set()  # (source, columns) already printed by load_problems


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
    When there is no answer field the answer is the last ``\\boxed{}`` of the solution (``pwopsd.grading.last_boxed``).
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
        raise ValueError(no_usable_records(source, len(rows), empty, {"problem": pf, "solution": sf, "answer": af}, ANSWER_FIELDS))
    return out


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
    for r in load_or_exit("data.py", load_problems, a.dataset, a.dataset_split, limit=a.limit, require_solution=False):
        print(json.dumps(r, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
