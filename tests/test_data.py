"""Problem loading, field detection, GSM8K / AIME formats, bad input."""
import json

import pytest

from conftest import FIXTURES
from data import demo_arithmetic, last_boxed, load_problems, split_gsm8k


def test_gsm8k_original_format():
    rows = load_problems(str(FIXTURES / "gsm8k_train.jsonl"), limit=3)
    r = rows[0]
    assert r["problem"].startswith("Natalia sold clips")
    assert r["answer"] == "72"
    assert "<<" not in r["solution"] and "####" not in r["solution"]
    assert r["solution"].endswith("72 clips altogether in April and May.")
    assert len(rows) == 3


def test_gsm8k_answer_with_thousands_separator():
    assert split_gsm8k("It is 1,000 + 234 = <<1000+234=1234>>1,234.\n#### 1,234") == ("It is 1,000 + 234 = 1,234.", "1234")


def test_aime_jsonl_needs_no_solution_for_evaluation():
    rows = load_problems(str(FIXTURES / "aime_format.jsonl"), require_solution=False, require_answer=True)
    assert len(rows) == 3
    assert all(r["answer"] and r["problem"] for r in rows)
    assert rows[0]["problem"].rstrip().endswith("\\boxed{}.")


def test_aime_for_training_reports_missing_solution_field():
    with pytest.raises(KeyError, match=r"aime_format.jsonl: no solution field .*columns are \['answer', 'problem'\]"):
        load_problems(str(FIXTURES / "aime_format.jsonl"))


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


# --------------------------------------------------------------------------------------------------
# Layouts people pass around: each written as a small file, each asserting the loaded values
# --------------------------------------------------------------------------------------------------
def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("column", ["response", "output", "completion", "generated_solution", "generation"])
def test_a_response_column_is_the_solution_and_its_last_box_the_answer(tmp_path, capsys, column):
    path = _jsonl(tmp_path / "r.jsonl", [{"question": "Half of 1?", column: "1/2, so \\boxed{\\frac{1}{2}}"},
                                         {"question": "Two boxes?", column: "\\boxed{3} then \\boxed{4}."}])
    rows = load_problems(path, require_answer=True)
    assert [(r["problem"], r["solution"], r["answer"]) for r in rows] == [
        ("Half of 1?", "1/2, so \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"), ("Two boxes?", "\\boxed{3} then \\boxed{4}.", "4")]
    load_problems(path, require_answer=True)  # the detected columns are printed once per source
    out = capsys.readouterr().out
    assert out.count("[data]") == 1
    assert f"problem <- 'question', solution <- '{column}', answer <- the last \\boxed{{}} of the solution" in out


def test_chat_rows(tmp_path):
    path = _jsonl(tmp_path / "chat.jsonl", [{"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": " What is 2+2? "},
        {"role": "assistant", "content": "Draft: \\boxed{5}"}, {"role": "user", "content": "Check it."},
        {"role": "assistant", "content": "2+2=4, so \\boxed{4}."}]}])
    assert load_problems(path) == [{"id": "0", "problem": "What is 2+2?", "solution": "2+2=4, so \\boxed{4}.",
                                    "answer": "4"}]
    sharegpt = _jsonl(tmp_path / "sharegpt.jsonl", [{"id": "s1", "conversations": [
        {"from": "human", "value": "What is 3*3?"}, {"from": "gpt", "value": "3*3=9: \\boxed{9}"}]}])
    assert load_problems(sharegpt) == [{"id": "s1", "problem": "What is 3*3?", "solution": "3*3=9: \\boxed{9}",
                                        "answer": "9"}]


def test_prompt_completion_rows_as_text_and_as_messages(tmp_path, capsys):
    text = _jsonl(tmp_path / "pc.jsonl", [{"prompt": "What is 6/2?", "completion": "6/2 = \\boxed{3}"}])
    assert [(r["problem"], r["solution"], r["answer"]) for r in load_problems(text)] == [
        ("What is 6/2?", "6/2 = \\boxed{3}", "3")]
    chat = _jsonl(tmp_path / "pc_chat.jsonl", [{"prompt": [{"role": "user", "content": "What is 7-2?"}],
                                                "completion": [{"role": "assistant", "content": "\\boxed{5}"}],
                                                "answer": 5}])
    assert [(r["problem"], r["solution"], r["answer"]) for r in load_problems(chat)] == [
        ("What is 7-2?", "\\boxed{5}", "5")]
    assert "problem <- 'prompt' (user message), solution <- 'completion' (last assistant message), answer <- 'answer'" \
        in capsys.readouterr().out


def _verl_row(i, question, truth, worked):
    return {"data_source": "openai/gsm8k", "ability": "math",
            "prompt": [{"role": "user", "content": question + " Let's think step by step."}],
            "reward_model": {"style": "rule", "ground_truth": truth},
            "extra_info": {"split": "train", "index": i, "answer": worked, "question": question}}


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_verl_rows_with_a_nested_answer(tmp_path, suffix):
    rows = [_verl_row(7, "Tom has 3 apples and buys 4. How many?", "7", "3 + 4 = <<3+4=7>>7\n#### 7"),
            _verl_row(8, "What is 10 - 1?", "9", "10 - 1 = <<10-1=9>>9\n#### 9")]
    path = tmp_path / f"verl{suffix}"
    if suffix == ".parquet":
        import pandas as pd

        pd.DataFrame(rows).to_parquet(path)
    else:
        _jsonl(path, rows)
    got = load_problems(str(path), require_solution=False, require_answer=True)
    assert [(r["id"], r["problem"], r["answer"], r["solution"]) for r in got] == [
        ("7", "Tom has 3 apples and buys 4. How many? Let's think step by step.", "7", ""),
        ("8", "What is 10 - 1? Let's think step by step.", "9", "")]
    # The worked GSM8K answer inside extra_info can be the teacher's solution (notes and "#### N" removed).
    got = load_problems(str(path), solution_field="extra_info.answer")
    assert [(r["solution"], r["answer"]) for r in got] == [("3 + 4 = 7", "7"), ("10 - 1 = 9", "9")]
    with pytest.raises(KeyError, match=r"no solution field 'extra_info.sol'; columns are .*'reward_model.ground_truth'"):
        load_problems(str(path), solution_field="extra_info.sol")


def test_nested_answer_fallbacks_and_list_answers(tmp_path):
    path = _jsonl(tmp_path / "n.jsonl", [
        {"problem": "Roots of x^2-8x+15?", "solution": "x = 3 or 5", "extra_info": {"answer": ["3", "5"]}},
        {"problem": "GSM-style?", "solution": "1 + 1 = 2", "extra_info": {"answer": "1 + 1 = <<1+1=2>>2\n#### 2"}}])
    assert [r["answer"] for r in load_problems(path)] == ["3, 5", "2"]
# ---- the shared command line (pwopsd.cli.parse_config) -----------------------------------------------------
from dataclasses import dataclass  # noqa: E402

from pwopsd.cli import arg, parse_config  # noqa: E402
from pwopsd.folders import check_same_settings, read_jsonl  # noqa: E402


@dataclass
class _Flags:
    max_steps: int = arg(150, check="> 0")
    top_p: float = arg(0.95, check="in (0, 1]")
    use_lora: bool = arg(True)
    rollout_backend: str = arg("auto", choices=("auto", "vllm", "hf"))
    seeds: list[int] = arg([0, 1, 2])
    limit: int | None = arg(None, check=">= 1")
    output_dir: str = arg("out")
    config: str | None = arg(None)


def _error(argv):
    with pytest.raises(SystemExit) as e:
        parse_config(_Flags, argv, prog="x.py")
    assert "\n" not in str(e.value)
    return str(e.value)


def test_parse_config_values_and_yaml(tmp_path):
    assert parse_config(_Flags, [], prog="x.py") == _Flags()
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max_steps: 3\nuse_lora: false\nseeds: [5]\ntop_p: 1\n")
    a = parse_config(_Flags, ["--config", str(cfg), "--seeds", "7", "8", "--limit=2"], prog="x.py")
    assert (a.max_steps, a.use_lora, a.seeds, a.limit, a.top_p, a.config) == (3, False, [7, 8], 2, 1.0, str(cfg))
    assert parse_config(_Flags, ["--use_lora", "TRUE"], prog="x.py").use_lora is True


@pytest.mark.parametrize("argv,message", [
    (["--max_step", "2"], "x.py: unknown flag --max_step (did you mean --max_steps?)"),
    (["--max"], "x.py: unknown flag --max"),  # never abbreviated
    (["--out", "d"], "x.py: unknown flag --out"),  # no renamed-flag aliases (issue 24)
    (["--rollout_backend", "vlm"], "x.py: --rollout_backend: unknown 'vlm' (choose from auto, vllm, hf)"),
    (["--max_steps", "0"], "x.py: --max_steps must be > 0 (got 0)"),
    (["--top_p", "0"], "x.py: --top_p must be in (0, 1] (got 0.0)"),
    (["--limit", "0"], "x.py: --limit must be >= 1 (got 0)"),
    (["--use_lora", "flase"], "x.py: --use_lora: expected true or false, got 'flase'"),
    (["--max_steps", "x"], "x.py: --max_steps: invalid int value: 'x'"),
])
def test_parse_config_errors_name_the_flag(argv, message):
    assert _error(argv) == message


def test_parse_config_bad_yaml(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max_stepz: 3\n")
    assert _error(["--config", str(cfg)]) == f"x.py: {cfg}: unknown key(s) max_stepz (did you mean max_steps?)"
    cfg.write_text("use_lora: 3\n")
    assert _error(["--config", str(cfg)]) == f"x.py: {cfg}: use_lora: expected true or false, got 3"
    cfg.write_text("max_steps: 2.5\n")
    assert _error(["--config", str(cfg)]) == f"x.py: {cfg}: max_steps: expected int, got 2.5"
    assert _error(["--config", str(tmp_path / "none.yaml")]) == f"x.py: --config: no such file {tmp_path / 'none.yaml'}"


def test_read_jsonl_repairs_a_torn_line(tmp_path, capsys):
    p = tmp_path / "r.jsonl"
    p.write_text('{"a": 1}\n{"b": "\u00e9"}\n{"c": 3, "d"')
    assert read_jsonl(p) == [{"a": 1}, {"b": "\u00e9"}] and p.read_text().endswith('"d"')  # read only
    assert read_jsonl(p, repair=True) == [{"a": 1}, {"b": "\u00e9"}]
    assert p.read_text() == '{"a": 1}\n{"b": "\u00e9"}\n' and "dropped 1 unreadable line" in capsys.readouterr().out
    assert read_jsonl(tmp_path / "absent.jsonl") == []


def test_check_same_settings(tmp_path):
    path = tmp_path / "settings.json"
    check_same_settings(path, {"top_p": 0.95, "n": 2}, "x.py")
    check_same_settings(path, {"top_p": 0.95, "n": 2}, "x.py")  # same: fine
    with pytest.raises(SystemExit, match=r"x.py: --output_dir .* holds a run made with --top_p=0.95 \(now 1.0\); use another"):
        check_same_settings(path, {"top_p": 1.0, "n": 2}, "x.py")
    check_same_settings(path, {"top_p": 1.0, "n": 2}, "x.py", active=False)  # nothing to continue: rewritten
    assert '"top_p": 1.0' in path.read_text()
    check_same_settings(path, {"top_p": 0.5, "n": 2}, "x.py", active=False, write=False)  # compare-only call writes nothing
    assert '"top_p": 1.0' in path.read_text()
    path.write_text('{"top_p": 1.')  # torn by a kill: one line, not a traceback
    with pytest.raises(SystemExit, match="unreadable settings"):
        check_same_settings(path, {"top_p": 1.0}, "x.py")


# ------------------------------------------------------------------------------------------ output folders
def _out_error(path, **kw):
    from pwopsd.folders import check_output_dir

    with pytest.raises(SystemExit) as e:
        check_output_dir(path, "x.py", **kw)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_check_output_dir_refuses_files_and_unwritable_folders(tmp_path, monkeypatch):
    import os

    from pwopsd.folders import check_output_dir

    f = tmp_path / "a_file"
    f.write_text("x")
    assert _out_error(f) == f"x.py: --output_dir {f}: is a file, not a folder"
    assert _out_error(f / "sub" / "dir") == f"x.py: --output_dir {f / 'sub' / 'dir'}: {f} is a file, not a folder"
    assert "--save_merged" in _out_error(f, flag="--save_merged")
    # empty (Path("") would be the current folder: the run would land in the repository root)
    assert _out_error("") == "x.py: --output_dir is empty: name a folder (e.g. --output_dir outputs/run1)"
    assert _out_error("  ", flag="--save_merged").startswith("x.py: --save_merged is empty")
    # a new folder below an existing one is fine and is not made here
    assert check_output_dir(tmp_path / "new" / "deeper", "x.py") == [] and not (tmp_path / "new").exists()
    assert os.listdir(tmp_path) == ["a_file"]  # the write probe left nothing behind
    # unwritable: a real read-only folder where permissions bind (not root), and a refused write for everyone
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        assert "is not writable" in _out_error(ro / "out")
        ro.chmod(0o700)
    import tempfile

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    assert _out_error(tmp_path / "out") == f"x.py: --output_dir {tmp_path / 'out'}: {tmp_path} is not writable (Permission denied)"


def test_check_output_dir_lists_an_earlier_run_and_clear_deletes_only_it(tmp_path):
    from pwopsd.folders import check_output_dir, clear_output_dir

    patterns = ("metrics.jsonl", "checkpoint-*")
    assert check_output_dir(tmp_path, "x.py", patterns) == []
    (tmp_path / "notes.txt").write_text("mine")
    assert check_output_dir(tmp_path, "x.py", patterns) == []  # other files are not a run
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "checkpoint-5").mkdir()
    (tmp_path / "checkpoint-5" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-10.tmp").mkdir()
    assert check_output_dir(tmp_path, "x.py", patterns) == ["checkpoint-10.tmp", "checkpoint-5", "metrics.jsonl"]
    assert clear_output_dir(tmp_path, patterns) == ["checkpoint-10.tmp", "checkpoint-5", "metrics.jsonl"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert clear_output_dir(tmp_path / "absent", patterns) == []


def test_a_folder_holding_another_scripts_run_is_refused(tmp_path):
    from pwopsd.folders import check_output_dir

    (tmp_path / "metrics.jsonl").write_text("{}\n")  # a training run
    (tmp_path / "summary.json").write_text("{}\n")
    with pytest.raises(SystemExit) as e:
        check_output_dir(tmp_path, "evaluate.py", ("samples.jsonl", "settings.json", "summary.json"))
    assert str(e.value) == f"evaluate.py: --output_dir {tmp_path} holds a train.py run (metrics.jsonl); use another --output_dir"
    assert check_output_dir(tmp_path, "train.py", ("metrics.jsonl", "checkpoint-*")) == ["metrics.jsonl"]  # its own
    (tmp_path / "metrics.jsonl").unlink()
    (tmp_path / "spines.jsonl").write_text("")  # a diagnose run: evaluate must not replace its summary.json
    with pytest.raises(SystemExit, match="holds a diagnose.py run"):
        check_output_dir(tmp_path, "evaluate.py", ("samples.jsonl", "settings.json", "summary.json"))


def test_a_config_that_is_not_yaml_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_steps: [3\n")
    message = _error(["--config", str(bad)])
    assert message.startswith(f"x.py: --config {bad}: not valid YAML (line 2, column 1)") and "\n" not in message


# ---------------------------------------------------------------------------------------------------------
# Issue 26, item 6: a missing answer column is named; a UTF-8 BOM is read; a leading instruction is removed
# ---------------------------------------------------------------------------------------------------------
def test_no_answer_column_is_named(tmp_path):
    path = tmp_path / "noanswer.jsonl"
    path.write_text("".join(json.dumps({"problem": f"q{i}", "solution": "no box here"}) + "\n" for i in range(4)))
    with pytest.raises(ValueError, match=r"none of the 4 has an answer -- there is no answer column \(tried answer, "
                                         r"Answer.*set --answer_field$"):
        load_problems(str(path), require_answer=True, verbose=False)
    path.write_text("".join(json.dumps({"problem": "", "solution": "s", "answer": "1"}) + "\n" for _ in range(3)))
    with pytest.raises(ValueError, match=r"the problem is empty in 3 of the 3 \(column 'problem'; set --problem_field\)"):
        load_problems(str(path), verbose=False)


def test_utf8_bom_files_are_read(tmp_path):
    row = {"problem": "What is 2+3?", "solution": "2+3=5", "answer": "5"}
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + (json.dumps(row) + "\n").encode())
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([row]).encode())
    for name in ("bom.jsonl", "bom.json"):
        (rec,) = load_problems(str(tmp_path / name), verbose=False)
        assert (rec["problem"], rec["answer"]) == ("What is 2+3?", "5")


def test_default_training_set_format_states_the_instruction_once():
    """The default training set's problems begin with OpenThoughts' "Return your final response within
    \\boxed{}." (fixture row in its layout, see tests/fixtures/README.md); the prompt states ours once."""
    from rollout import INSTRUCTION, problem_message

    recs = load_problems(str(FIXTURES / "openthoughts_opsd_format.jsonl"), verbose=False)
    assert [r["answer"] for r in recs] == ["50", "2"]  # its "Answer" column
    assert recs[0]["problem"].startswith("Return your final response within \\boxed{}.")
    message = problem_message(recs[0]["problem"])
    assert message == f"Problem: A rectangle has perimeter $30$ and its length is twice its width. Find its area.\n\n{INSTRUCTION}"
    assert message.count("\\boxed{}") == 1
