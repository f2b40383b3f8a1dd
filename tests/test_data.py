"""Problem loading, field detection, GSM8K / AIME formats, bad input."""
import json

import pytest

from conftest import SHARED
from data import demo_arithmetic, last_boxed, load_problems, split_gsm8k


def test_gsm8k_original_format():
    rows = load_problems(str(SHARED / "gsm8k" / "train.jsonl"), limit=3)
    r = rows[0]
    assert r["problem"].startswith("Natalia sold clips")
    assert r["answer"] == "72"
    assert "<<" not in r["solution"] and "####" not in r["solution"]
    assert r["solution"].endswith("72 clips altogether in April and May.")
    assert len(rows) == 3


def test_gsm8k_answer_with_thousands_separator():
    assert split_gsm8k("It is 1,000 + 234 = <<1000+234=1234>>1,234.\n#### 1,234") == ("It is 1,000 + 234 = 1,234.", "1234")


def test_aime_jsonl_needs_no_solution_for_evaluation():
    rows = load_problems(str(SHARED / "aime24" / "test.jsonl"), require_solution=False, require_answer=True)
    assert len(rows) == 30
    assert all(r["answer"] and r["problem"] for r in rows)
    assert rows[0]["problem"].rstrip().endswith("\\boxed{}.")


def test_aime_for_training_reports_missing_solution_field():
    with pytest.raises(KeyError, match=r"aime24/test.jsonl: no solution field .*columns are \['answer', 'problem'\]"):
        load_problems(str(SHARED / "aime24" / "test.jsonl"))


def test_field_override_and_missing_override(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text(json.dumps({"q": "What is 1+1?", "worked": "1+1=2, so \\boxed{2}"}) + "\n")
    rows = load_problems(str(p), problem_field="q", solution_field="worked")
    assert rows[0]["answer"] == "2"  # no answer field: the last \boxed{} of the solution
    with pytest.raises(KeyError, match=r"x.jsonl: no problem field 'question'; columns are \['q', 'worked'\]"):
        load_problems(str(p), problem_field="question")


def test_empty_records_are_skipped_and_counted(tmp_path, capsys):
    p = tmp_path / "y.jsonl"
    rows = [{"problem": "A", "solution": "s"}, {"problem": "", "solution": "s"}, {"problem": "B", "solution": " "},
            {"problem": "C", "solution": "t", "answer": "3"}]
    p.write_text("\n".join(json.dumps(r) for r in rows))
    out = load_problems(str(p))
    assert [r["problem"] for r in out] == ["A", "C"]
    assert "skipped 2 record(s)" in capsys.readouterr().out


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_problems(str(tmp_path / "nope.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "x"}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: not valid JSON"):
        load_problems(str(bad))


def test_demo_arithmetic_is_seeded_and_self_consistent():
    a, b = demo_arithmetic(50, seed=3), demo_arithmetic(50, seed=3)
    assert a == b and a != demo_arithmetic(50, seed=4)
    for r in a:
        assert last_boxed(r["solution"]) == r["answer"] and int(r["answer"]) >= 0
        # every "x op y = z" step is right
        for line in r["solution"].splitlines()[1:-1]:
            lhs, rhs = line.split(" = ")
            expr = lhs.split(" has ")[-1].split(" hold ")[-1]
            assert eval(expr) == int(rhs.split()[0]), line
    assert load_problems("demo-arithmetic", limit=5) == a[:0] + demo_arithmetic(5, 0)


@pytest.mark.parametrize("text,expected", [
    ("so \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("\\boxed{1} then \\boxed{2}", "2"),
    ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
    ("answer: \\boxed 5.", "5"),
    ("\\boxed{}", ""),
    ("no box", None),
    ("\\boxed{3} and \\boxed{unclosed", "3"),
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected
