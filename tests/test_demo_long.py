"""demo-arithmetic-long (issue 25): seeded, every step right, several times longer than demo-arithmetic, a
held-out split disjoint from training, and reachable by name from data.py and evaluate.py."""
import re
import statistics

import pytest

import evaluate
from data import load_problems
from pwopsd.demo import DEMO_SOURCES, demo_arithmetic, demo_arithmetic_long, demo_heldout
from pwopsd.grading import last_boxed


def check_chain(r):
    """Every ``a op b = c`` line is right and each line starts from the previous running total."""
    lines = r["solution"].splitlines()
    have = int(re.search(r"starts with (\d+)", lines[0]).group(1))
    for line in lines[1:-1]:
        lhs, rhs = line.split(" = ")
        a, op, b = lhs.split()[-3:]
        value = int(rhs.split()[0])
        assert eval(f"{a} {op} {b}") == value, line
        if op != "*":  # a running-total line continues from the last total; "bags hold" lines are side products
            assert int(a) == have, line
            have = value
    assert str(have) == r["answer"] == last_boxed(r["solution"])
    assert int(r["answer"]) >= 1


def test_long_problems_are_seeded_right_and_long():
    a = demo_arithmetic_long(300, seed=0)
    assert a == demo_arithmetic(300, 0, style="long") and a[:7] == demo_arithmetic_long(7, 0)
    assert a != demo_arithmetic_long(300, seed=1)
    for r in a:
        check_chain(r)
        assert 10 <= len(r["solution"].splitlines()) <= 22
        assert r["problem"].endswith("have now?") and r["problem"].count("Then ") in range(8, 11)
    short = demo_arithmetic(300, 0)
    ratio = statistics.mean(len(r["solution"]) for r in a) / statistics.mean(len(r["solution"]) for r in short)
    assert ratio > 3.0  # "several times longer" (3.6x in characters, ~237 vs ~64 SmolLM2 tokens)


def test_long_heldout_split_is_disjoint_and_named():
    assert DEMO_SOURCES["demo-arithmetic-long"] == ("long", False)
    assert DEMO_SOURCES["demo-arithmetic-long-test"] == ("long", True)
    train = {r["problem"] for r in demo_arithmetic_long(2000, 0)}
    test = demo_heldout(100, "long")
    assert len(test) == 100 and not train & {r["problem"] for r in test}
    assert [r["id"] for r in test[:2]] == ["demo-test-0", "demo-test-1"]
    for r in test:
        check_chain(r)
    assert load_problems("demo-arithmetic-long-test", limit=5) == test[:5]
    assert load_problems("demo-arithmetic-long", limit=3) == demo_arithmetic_long(3, 0)
    # the other styles' held-out splits are unchanged by the style-aware training set
    assert demo_heldout(20, "steps") == demo_heldout(20) and demo_heldout(5, "flat")[0]["id"] == "demo-test-0"
    assert [r["problem"] for r in demo_heldout(20, "flat")] == [r["problem"] for r in demo_heldout(20)]


def test_evaluate_knows_the_long_benchmark():
    evaluate.check_eval_benchmarks(["demo-arithmetic-long-test"])  # no error: an offline built-in
    with pytest.raises(ValueError, match="unknown style"):
        demo_arithmetic(2, 0, style="longer")
