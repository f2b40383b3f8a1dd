"""Grading: what counts as a model's final answer, and when it equals the reference.

What the grader accepts
-----------------------
The **final answer** is the content of the response's last ``\\boxed{...}`` (or ``\\fbox{...}``, or
``\\boxed 5`` -- a bare number; the word ``\\boxed`` in prose is no answer). Boxes directly before it that are joined to
it only by a connector -- ``,``, ``;``, ``and``, ``or``, layout such as ``$``/``\\quad``, optionally a label
like ``y =`` -- belong to the same answer, which is then the set of their contents (``\\boxed{3} and
\\boxed{5}`` answers ``3, 5``). A box followed by more prose and another box was revised, and only the later
one counts (``\\boxed{4} ... no, \\boxed{3}`` answers ``3``). A response whose last box is not closed (cut off
at the token budget) has **no** answer, even if an earlier box is complete; no box or an empty box is also
wrong. Which part of the response is searched is the grading rule (``GRADING_RULES``): the text after
``</think>`` of an untruncated response (strict), or the whole text (the authors'). The answer is compared
with the reference (a bare answer, or GSM8K's ``... #### N``) by math-verify: both are parsed with its
boxed-priority LaTeX extraction and compared with ``verify`` (fractions, decimals, ``\\dfrac``, percentages,
``\\sqrt``, sets in any order, tuples, intervals, matrices, ``x = 5`` vs ``5``, algebraically equal expressions). On top:
  * **intervals and inequalities** are compared in both directions: ``x > 2`` and ``(2, \\infty)`` are the
    same answer whichever is the reference; ``x < -1 or x > 3`` equals ``(-\\infty,-1) \\cup (3,\\infty)``;
  * **numbers are compared relatively**: exact forms (integers, fractions, powers, factorials, surds)
    must agree to a relative 1e-40 when evaluated with 60 significant digits, i.e. be equal, however small
    or large (``1/2^{98}`` is not ``1/2^{99}``); a decimal must match math-verify's rounding to 6 decimal
    places *and* be within a relative 1e-3 (so ``0.000001`` is not ``1/2^{20}``);
  * **units and text around a number**: a unit or word after a number is dropped (``5 \\text{ cm}``,
    ``\\text{5 apples}``, ``18 \\text{ dollars}``, ``90^\\circ``, ``\\$18`` are all ``5`` / ``18`` / ``90``);
    words *before* a number (``\\text{about } 5``) and number words (``\\text{five}``) are not read as the
    number. Pure text answers (``\\text{Evelyn}``, ``\\text{(C)}`` vs ``C``) compare as text.
Only when math-verify cannot parse one side at all is a normalised string comparison used.

Time limit: every comparison runs in a separate worker process (started on first use, one per
grading process, shared by its threads under a lock) and is given ``timeout`` seconds of wall-clock
time; a comparison that takes longer -- a tower of powers holds the GIL inside one C call, so no
signal or thread can stop it in-process -- is graded wrong, counted in ``STATS["timeouts"]``, and the
worker is killed and restarted on the next call. Inside the worker, math-verify's own alarm stops
each parse / verify after half the budget (at least 1 s), which usually ends a slow case without a
restart (also counted). This works from any thread and any process (a daemonic multiprocessing worker
included, since the worker is a plain subprocess); concurrent callers wait for each other.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import re
import select
import subprocess
import sys
import threading
import time
import zlib
from functools import lru_cache


EXACT_RTOL = 1e-40  # exact forms: relative difference at 60 significant digits (i.e. equal)
DECIMAL_RTOL = 1e-3  # decimals: on top of math-verify's rounding to 6 decimal places
STARTUP_TIMEOUT = 120.0  # seconds for the worker to import sympy / math-verify (a loaded machine is slow)
STATS = {"calls": 0, "timeouts": 0, "crashes": 0, "starts": 0}  # of this process's worker calls

# Answers: the last \boxed{} of a text (data.py reads reference answers with these, too).
_BOX = re.compile(r"\\(?:boxed|fbox)\b")


def boxes(text: str) -> list[tuple[int, int, str | None]]:
    """``(start, end, content)`` of each top-level ``\\boxed{...}`` / ``\\fbox{...}`` of ``text`` in order,
    nested braces handled; ``\\boxed 5`` (no braces: a number only) gives ``"5"``, ``\\boxed form`` nothing.
    ``content`` is ``None`` for an unclosed box, which then runs to the end of ``text`` (so it is the last). The one
    box scanner of the project: ``last_boxed`` for reference solutions, ``extract_answer`` for responses."""
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
    empty box ``""``. (A *response* with an unclosed last box has no answer: ``extract_answer``.)
    """
    closed = [c for _, _, c in boxes(text or "") if c is not None]
    return closed[-1] if closed else None


def split_gsm8k(answer: str) -> tuple[str, str]:
    """GSM8K worked answer -> (solution without ``<<...>>`` notes, final answer after ``####``)."""
    body, _, final = answer.rpartition("####")
    solution = re.sub(r"<<[^>]*>>", "", body).strip()
    return solution, final.strip().replace(",", "")


def stable_seed(*parts) -> int:
    """A 31-bit seed from ``parts`` that is the same in every process (unlike ``hash``)."""
    return zlib.crc32("|".join(map(str, parts)).encode()) & 0x7FFFFFFF


# --------------------------------------------------------------------------------------------------
# Which box is the answer
# --------------------------------------------------------------------------------------------------
_LAYOUT = r"(?:\s|\$|\\[(),;:!\[\]]|\\q?quad\b|~|&|\\text\{\s*\})*"
_CONNECTOR = r"(?:,|;|\band\b|\bor\b|\\text\{\s*(?:and|or|,)\s*\})"
_LABEL = r"(?:[A-Za-z](?:_\{?\w+\}?)?\s*=)"  # "y =" in "x = \boxed{3}, y = \boxed{5}"
_JOINED = re.compile(rf"{_LAYOUT}(?:{_CONNECTOR}{_LAYOUT})?(?:{_LABEL}{_LAYOUT})?")


def extract_answer(response: str) -> str | None:
    """The final answer of ``response``: its last box, with the boxes joined to it as one answer set.

    Returns the box content as written (``"\\dfrac{3}{4}"``), the contents of joined boxes separated
    by ``", "`` (``"3, 5"``), ``""`` for an empty box, and ``None`` when there is no box or the last box
    is unclosed (a truncated response has no final answer). Never raises.

    math-verify's own extraction is not used to *choose* the box because it differs in two ways that
    matter here: it returns every box of a response as one set (a revised ``\\boxed{3} ... \\boxed{4}``
    becomes ``{3, 4}``) and it reads an earlier box when the last one is cut off.
    """
    found = boxes(response or "")
    if not found or found[-1][2] is None:
        return None
    group = [found[-1]]
    for prev in reversed(found[:-1]):
        if not _JOINED.fullmatch(response[prev[1]:group[0][0]]):
            break
        group.insert(0, prev)
    parts = [c for _, _, c in group if c]
    return ", ".join(parts) if len(group) > 1 else group[0][2]


# --------------------------------------------------------------------------------------------------
# Equivalence (runs in the worker process)
# --------------------------------------------------------------------------------------------------
def _normalise(answer: str) -> str:
    """Loose string form used only when math-verify cannot parse an answer at all."""
    s = answer.strip().strip("$").strip()
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\(?:left|right|displaystyle|!|,|;|:)", "", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\s+", "", s).rstrip(".").lower()
    return s


# "\text{5 apples}" -> "5\text{ apples}": math-verify drops a unit *after* a number, not inside one text.
_TEXT_NUMBER = re.compile(r"\\(?:text|textrm|textbf|mbox|mathrm)\s*\{\s*(-?\$?\d[\d,]*(?:\.\d+)?)\s+([A-Za-z][^{}\\]*)\}")


def _or_of_inequalities(value):
    """``{x < -1, x > 3}`` (how math-verify parses ``x < -1 or x > 3``) -> the union of their solution sets."""
    import sympy

    args = getattr(value, "args", ())
    if not isinstance(value, sympy.FiniteSet) or not args:
        return value
    if not all(isinstance(a, sympy.core.relational.Relational) and not isinstance(a, (sympy.Eq, sympy.Ne))
               for a in args):
        return value
    symbols = set().union(*(a.free_symbols for a in args))
    if len(symbols) != 1:
        return value
    try:
        return sympy.Union(*(a.as_set() for a in args))
    except Exception:  # as_set is not defined for every relation; keep math-verify's value then
        return value


@lru_cache(maxsize=1 << 16)
def _parse(answer: str, timeout: int | None) -> tuple:
    """math-verify parse of a bare answer (``"\\frac12"``), cached: references and votes repeat a lot.

    The answer is boxed so that math-verify reads exactly this expression; if that finds nothing, it is
    tried as inline math. ``timeout`` is math-verify's own (SIGALRM, main thread only) limit, or None.
    Returns ``()`` when it cannot be parsed.
    """
    from math_verify import LatexExtractionConfig, parse

    answer = answer.strip().replace("\\varnothing", "\\emptyset")
    answer = _TEXT_NUMBER.sub(r"\1\\text{ \2}", answer)
    if not answer:
        return ()
    if "\\boxed" in answer:
        candidates = [answer]
    else:
        candidates = [f"\\boxed{{{answer}}}", answer if answer.startswith("$") else f"${answer}$"]
    config = [LatexExtractionConfig(boxed_match_priority=0)]
    for text in candidates:
        parsed = parse(text, config, parsing_timeout=timeout) if text.startswith("\\boxed") else \
            parse(text, parsing_timeout=timeout)
        if parsed:
            if re.search(r"\bor\b|\\lor|\\vee", answer):
                parsed = [_or_of_inequalities(parsed[0])] + parsed[1:]
            return tuple(parsed)
    return ()


def _relative_numeric_eq(original):
    """Wrap math-verify's ``sympy_numeric_eq`` so that numbers are compared relatively.

    math-verify evaluates ``(a - b).evalf(chop=True)``, which chops any difference below ~1e-15 to zero
    (so ``1/2^98 == 1/2^99`` and ``1/2006! == 1/2004!``), and rounds decimals to 6 places (so every
    number below 5e-7 equals 0). This keeps its verdict only when, in addition, the two numbers agree
    to ``EXACT_RTOL`` (no decimal on either side) or ``DECIMAL_RTOL`` (a decimal on either side).
    """
    import sympy
    from sympy import Float, MatrixBase, UnevaluatedExpr

    def plain_number(x) -> bool:
        return isinstance(x, sympy.Expr) and not isinstance(x, MatrixBase) and bool(x.is_number) \
            and not x.has(UnevaluatedExpr)  # UnevaluatedExpr marks a percentage: math-verify's call

    def numeric_eq(a, b, float_rounding, numeric_precision):
        if not original(a, b, float_rounding, numeric_precision):
            return False
        if not (plain_number(a) and plain_number(b)):
            return True
        try:
            x, y = sympy.N(a, 60), sympy.N(b, 60)
            scale = max(abs(x), abs(y))
            if not (scale.is_finite and (x - y).is_finite):
                return True
            rtol = DECIMAL_RTOL if (a.has(Float) or b.has(Float)) else EXACT_RTOL
            return bool(abs(x - y) <= rtol * scale)
        except Exception:  # cannot evaluate: keep math-verify's verdict
            return True

    return numeric_eq


def _install_relative_numbers():
    from math_verify import grader

    if not getattr(grader.sympy_numeric_eq, "_relative", False):
        grader.sympy_numeric_eq = _relative_numeric_eq(grader.sympy_numeric_eq)
        grader.sympy_numeric_eq._relative = True


def _compare(gold: str, pred: str, step_timeout: int | None) -> bool:
    """math-verify equivalence of two bare answers; normalised string equality if either fails to parse.

    Called in the worker process (it patches math-verify's numeric comparison there, see
    ``_relative_numeric_eq``). ``step_timeout`` is math-verify's own limit per parse / verify.
    """
    from math_verify import verify

    _install_relative_numbers()
    g, p = _parse(gold, step_timeout), _parse(pred, step_timeout)
    if g and p:
        try:
            return bool(verify(list(g), list(p), allow_set_relation_comp=True, timeout_seconds=step_timeout))
        except Exception:  # math-verify raises only on odd inputs; a grader must not crash an eval
            return False
    return _normalise(gold) != "" and _normalise(gold) == _normalise(pred)


class _TimeoutFlag(logging.Handler):
    """Notices math-verify's own "Timeout during ..." warnings, which it otherwise only logs."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.hit = False

    def emit(self, record):
        if record.getMessage().startswith("Timeout"):
            self.hit = True


def _serve():
    """Worker loop: one JSON request ``[gold, pred, timeout]`` per stdin line -> ``[correct, timed_out]``."""
    reply = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)  # anything a library prints goes to stderr, not into the replies
    flag = _TimeoutFlag()
    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addHandler(flag)
    import math_verify  # noqa: F401  (import before "ready", so no request pays for it)

    _install_relative_numbers()
    reply.write(b"ready\n")
    for line in sys.stdin.buffer:
        gold, pred, timeout = json.loads(line)
        flag.hit = False
        try:
            ok = _compare(gold, pred, max(1, int(timeout) // 2))
        except Exception:
            ok = False
        reply.write((json.dumps([ok, flag.hit]) + "\n").encode())


# --------------------------------------------------------------------------------------------------
# The worker process, seen from the grading process
# --------------------------------------------------------------------------------------------------
_state = {"pid": None, "proc": None, "lock": None}


def _read_line(fd: int, deadline: float) -> bytes | None:
    """One line from ``fd``: ``None`` when ``deadline`` passes first; what came before end of file
    (without its ``\n``) when the writer died."""
    data = b""
    while not data.endswith(b"\n"):
        wait = deadline - time.monotonic()
        if wait <= 0 or not select.select([fd], [], [], wait)[0]:
            return None
        chunk = os.read(fd, 4096)
        if not chunk:
            return data
        data += chunk
    return data


def _stop_worker():
    proc = _state["proc"]
    _state["proc"] = None
    if proc is not None and _state["pid"] == os.getpid():
        proc.kill()
        proc.wait()
        proc.stdin.close()
        proc.stdout.close()


def _owned() -> threading.Lock:
    """The lock of this process's worker; after a fork the parent's worker (and lock state) is not ours."""
    if _state["pid"] != os.getpid():
        _state.update(pid=os.getpid(), proc=None, lock=threading.Lock())
        STATS.update(dict.fromkeys(STATS, 0))
    return _state["lock"]


def _worker():
    """This process's worker, started on first use and again after a timeout or a crash."""
    if _state["proc"] is not None and _state["proc"].poll() is not None:
        _stop_worker()
    if _state["proc"] is None:
        try:
            proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker"],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0,
                                    cwd=os.path.dirname(os.path.abspath(__file__)))
        except OSError as e:
            raise RuntimeError(f"grading: cannot start the grading worker ({sys.executable}): {e}") from None
        if _read_line(proc.stdout.fileno(), time.monotonic() + STARTUP_TIMEOUT) != b"ready\n":
            proc.kill()
            proc.wait()
            raise RuntimeError("grading: the grading worker did not start (is math-verify installed?)")
        STATS["starts"] += 1
        _state["proc"] = proc
    return _state["proc"]


atexit.register(lambda: _stop_worker())


@lru_cache(maxsize=1 << 16)
def _equivalent(gold: str, pred: str, timeout: float) -> bool:
    """``_compare(gold, pred)`` in the worker within ``timeout`` seconds; over time or crashed = False.

    Cached, so a vote never waits twice for the same hung pair. Raises ValueError for ``timeout <= 0``
    and RuntimeError when the worker process cannot be started.
    """
    if not timeout or timeout <= 0:
        raise ValueError(f"grading: timeout must be > 0 seconds (got {timeout!r})")
    request = (json.dumps([gold, pred, timeout]) + "\n").encode()
    with _owned():
        proc = _worker()
        STATS["calls"] += 1
        try:
            proc.stdin.write(request)
            line = _read_line(proc.stdout.fileno(), time.monotonic() + timeout)
        except BrokenPipeError:
            line = b""
        if line is None or not line.endswith(b"\n"):
            STATS["timeouts" if line is None else "crashes"] += 1
            what = f"took over {timeout} s" if line is None else "crashed"
            print(f"[grading] comparison {what}, graded wrong: {pred[:80]!r} vs {gold[:80]!r}", file=sys.stderr)
            _stop_worker()
            return False
        ok, timed_out = json.loads(line)
        STATS["timeouts"] += bool(timed_out)
        return bool(ok)


# --------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------
# Which part of a response the answer is read from (docs/grading_rules.md):
#   strict  -- the text after the thinking closes (the last ``</think>``); a truncated response, or one whose
#              ``<think>`` never closes, has no answer. Training's ``correct`` and diagnose.py's labels use it.
#   authors -- the last box anywhere in the text, truncated or not, as the PW-OPSD authors' evaluation does
#              (its eval/evaluate_math.py); needed to reproduce the paper's numbers (configs/eval-paper.yaml).
GRADING_RULES = ("strict", "authors")


def answer_text(response: str, truncated: bool = False, rule: str = "strict") -> str | None:
    """The part of ``response`` its final answer is read from under ``rule`` (``GRADING_RULES``), or None
    when it has none (strict: truncated, or thinking opened and never closed). Raises ValueError on an
    unknown rule."""
    if rule not in GRADING_RULES:
        raise ValueError(f"grading rule must be one of {', '.join(GRADING_RULES)} (got {rule!r})")
    response = response or ""
    if rule == "authors":
        return response
    if truncated:
        return None
    _, closed, after = response.rpartition("</think>")
    if closed:
        return after
    return None if "<think>" in response else response


def grade(response: str, reference: str, timeout: int = 5, *, truncated: bool = False,
          rule: str = "strict") -> tuple[str | None, bool]:
    """Grade one response against a reference answer (the rules are in the module docstring).

    Args:
        response: the model's text; its final boxed answer (``extract_answer``) is graded.
        reference: a bare answer (``"\\frac{1}{2}"``, ``"72"``) or a GSM8K answer ending in ``#### 72``.
        timeout: wall-clock seconds for the comparison, from any thread; over time = wrong (and counted
            in ``STATS["timeouts"]``).
        truncated: the response hit its token budget without a stop token (``Rollout.truncated``).
        rule: ``"strict"`` (answer after ``</think>``; truncated = no answer) or ``"authors"`` (last box
            anywhere), see ``answer_text``.
    Returns:
        ``(extracted answer or None, correct)``. No box, an unclosed last box or an empty box is
        ``(None | "", False)``.
    Raises:
        ValueError: empty reference, ``timeout <= 0`` or an unknown rule.
    """
    if reference is None or not str(reference).strip():
        raise ValueError("grade: empty reference answer")
    reference = str(reference)
    if "####" in reference:
        reference = split_gsm8k(reference)[1]
    text = answer_text(response, truncated, rule)
    if text is None:
        return None, False
    answer = extract_answer(text)
    if answer is None or not answer.strip():
        return answer, False
    return answer, _equivalent(reference, answer, timeout)


def _same(a: str, b: str, timeout: int) -> bool:
    """Symmetric equivalence: math-verify's ``verify`` is not (e.g. set vs relation, assignments)."""
    return a == b or _equivalent(a, b, timeout) or _equivalent(b, a, timeout)


def majority_correct(answers: list[str | None], correct: list[bool], timeout: int = 5) -> float:
    """Maj@n of one problem: 1.0 / 0.0 when one cluster wins, a fraction on a tie.

    ``answers`` are extracted answers (``None`` / ``""`` = unboxed: the invalid cluster, wrong if it wins);
    ``correct`` their grades. Clusters are the connected components of the symmetric relation "a equals
    b or b equals a" over the distinct answers, so they do not depend on the sample order. A cluster is
    correct when any of its members was graded correct: its members are one value written differently,
    and the reference equals that value if it equals any spelling of it. A tie between the largest
    clusters counts the fraction of them that are correct (= a uniformly random tie-break, in
    expectation). The result is the same for every order of the samples.
    """
    if len(answers) != len(correct):
        raise ValueError(f"majority_correct: {len(answers)} answers but {len(correct)} grades")
    invalid = sum(a is None or not a.strip() for a in answers)
    distinct = sorted({a for a in answers if a is not None and a.strip()})
    parent = list(range(len(distinct)))  # union-find over the distinct answers

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(len(distinct)):
        for j in range(i + 1, len(distinct)):
            if root(i) != root(j) and _same(distinct[i], distinct[j], timeout):
                parent[root(j)] = root(i)
    index = {a: i for i, a in enumerate(distinct)}
    size: dict[int, int] = {}
    right: dict[int, bool] = {}
    for a, ok in zip(answers, correct):
        if a is None or not a.strip():
            continue
        r = root(index[a])
        size[r] = size.get(r, 0) + 1
        right[r] = right.get(r, False) or bool(ok)
    top = max(list(size.values()) + [invalid])
    if top == 0:
        return 0.0
    winners = [right[r] for r in size if size[r] == top] + ([False] if invalid == top else [])
    return sum(winners) / len(winners)


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    _serve()
