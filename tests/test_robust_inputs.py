"""Bad input found by a fresh-user trial: each stops the script with ONE line naming the file (and line, field or
flag) -- never a Python traceback -- before a model loads."""
import json
from dataclasses import dataclass
from types import SimpleNamespace

import pytest

import data
import diagnose
import evaluate
import pwopsd.run
import rollout
import teacher
from pwopsd.cli import arg, parse_config
from pwopsd.folders import check_same_settings


def one_line_exit(fn, *args) -> str:
    """``fn(*args)`` must raise SystemExit with a one-line message; returns it."""
    with pytest.raises(SystemExit) as e:
        fn(*args)
    message = str(e.value)
    assert "\n" not in message and "Traceback" not in message
    return message


@pytest.fixture
def files(tmp_path, monkeypatch):
    """Bad problem files, in the current folder (messages name them as the user typed them)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "list.jsonl").write_text('{"problem": "1+1", "solution": "2"}\n[1, 2]\n')
    (tmp_path / "empty.json").write_text("{}")
    (tmp_path / "list.json").write_text('[{"problem": "1+1"}, "2+2"]')
    (tmp_path / "broken.json").write_text('[{"problem": "1+1"},\n {"problem": ]')
    (tmp_path / "utf16.jsonl").write_bytes(b'\xff\xfe{"problem": "1+1"}\n')
    (tmp_path / "latin1.jsonl").write_bytes(b'{"problem": "1+1"}\n{"problem": "caf\xe9"}\n')
    (tmp_path / "x.csv").write_text("problem,solution\n1+1,2\n")
    (tmp_path / "bad.parquet").write_bytes(b"not a parquet file")
    (tmp_path / "two.jsonl").write_text('{"problem": "1+1", "solution": "2"}\n{"problem": "2+2", "solution": "4"}\n')
    return tmp_path


@pytest.mark.parametrize("dataset,message", [
    ("missing.jsonl", "data.py: --dataset missing.jsonl: no such file"),                                      # case 1
    ("empty.jsonl", "data.py: --dataset empty.jsonl: no records"),                                            # case 1
    ("list.jsonl", 'data.py: --dataset list.jsonl:2: expected a JSON object {"problem": ...}, got list [1, 2]'),  # case 2
    ("list.json", 'data.py: --dataset list.json: record 1: expected a JSON object {"problem": ...}, got str 2+2'),
    ("empty.json", "data.py: --dataset empty.json: no records"),                                              # case 3
    ("broken.json", "data.py: --dataset broken.json:2: not valid JSON (Expecting value)"),
    ("utf16.jsonl", "data.py: --dataset utf16.jsonl: line 1 is not UTF-8 text (byte 0xff) (it is UTF-16); "   # case 4
                    "save the file as UTF-8"),
    ("latin1.jsonl", "data.py: --dataset latin1.jsonl: line 2 is not UTF-8 text (byte 0xe9); save the file as UTF-8"),
    ("x.csv", "data.py: --dataset x.csv: unsupported file type; use .jsonl/.json/.parquet"),                  # case 5
])
def test_data_py_bad_dataset_is_one_line(files, dataset, message):
    assert one_line_exit(data.main, ["--dataset", dataset]) == message


def test_unreadable_parquet_names_the_file(files):
    assert one_line_exit(data.main, ["--dataset", "bad.parquet"]).startswith(
        "data.py: --dataset bad.parquet: not a readable parquet file (")


def test_rollout_and_teacher_bad_dataset_is_one_line(files):
    # each fails before its tokenizer / model loads (the model named does not exist)
    assert one_line_exit(rollout.main, ["--dataset", "missing.jsonl", "--model", "no/such-model"]) == \
        "rollout.py: --dataset missing.jsonl: no such file"
    assert one_line_exit(teacher.main, ["--dataset", "empty.jsonl", "--model", "no/such-model"]) == \
        "teacher.py: --dataset empty.jsonl: no records"
    # case 6: --index past the end of the dataset
    assert one_line_exit(teacher.main, ["--dataset", "two.jsonl", "--index", "2", "--model", "no/such-model"]) == \
        "teacher.py: --index 2: --dataset two.jsonl has 2 usable problem(s) (index 0 to 1)"


def test_train_load_dataset_names_a_non_utf8_file(files):
    # case 4: the message was the codec's, its first quote stripped, without the file
    args = SimpleNamespace(dataset="latin1.jsonl", dataset_split="train", problem_field=None, solution_field=None,
                           answer_field=None)
    assert one_line_exit(pwopsd.run.load_dataset, args, data.load_problems) == \
        "train.py: --dataset latin1.jsonl: line 2 is not UTF-8 text (byte 0xe9); save the file as UTF-8"
    args.dataset = "list.jsonl"  # a KeyError / ValueError keeps its text whole, with the flag
    assert one_line_exit(pwopsd.run.load_dataset, args, data.load_problems).startswith(
        "train.py: --dataset list.jsonl:2: expected a JSON object")


@dataclass
class _Flags:
    dataset: str = arg("demo-arithmetic")
    config: str | None = arg(None)


def test_config_not_utf8_is_one_line(tmp_path):
    # case 7
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(b"# a config\ndataset: caf\xe9.jsonl\n")
    assert one_line_exit(lambda: parse_config(_Flags, ["--config", str(cfg)], prog="x.py")) == \
        f"x.py: --config {cfg}: line 2 is not UTF-8 text (byte 0xe9); save the file as UTF-8"
    cfg.write_bytes("dataset: caf\u00e9.jsonl\n".encode())  # UTF-8 is read whatever the locale
    assert parse_config(_Flags, ["--config", str(cfg)], prog="x.py").dataset == "caf\u00e9.jsonl"


# ---- case 9: a folder written before a flag existed resumes when the flag is at its default ------------------
def test_check_same_settings_missing_key_is_the_default(tmp_path):
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"top_p": 0.95}))  # made before --grading existed
    defaults = {"top_p": 1.0, "grading": "strict"}
    check_same_settings(path, {"top_p": 0.95, "grading": "strict"}, "x.py", defaults=defaults, write=False)
    with pytest.raises(SystemExit, match=r"--grading='strict' \(now 'authors'\)"):  # a real difference
        check_same_settings(path, {"top_p": 0.95, "grading": "authors"}, "x.py", defaults=defaults, write=False)
    with pytest.raises(SystemExit, match=r"--top_p=0.95 \(now 1.0\)"):  # a recorded value still wins over the default
        check_same_settings(path, {"top_p": 1.0, "grading": "strict"}, "x.py", defaults=defaults, write=False)
    with pytest.raises(SystemExit, match=r"--grading=None \(now 'strict'\)"):  # without defaults: as before
        check_same_settings(path, {"top_p": 0.95, "grading": "strict"}, "x.py", write=False)


def test_diagnose_resumes_a_folder_made_before_a_flag(tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    old = {k: v for k, v in vars(diagnose.Args()).items()
           if k in diagnose.EXPERIMENT_FLAGS and k not in ("alternatives_exclude_spine", "grading")}
    (out / "config.json").write_text(json.dumps(old))
    (out / "spines.jsonl").write_text("")
    assert diagnose.parse_args(["--output_dir", str(out)]).output_dir == str(out)
    message = one_line_exit(diagnose.parse_args, ["--output_dir", str(out), "--alternatives_exclude_spine", "true"])
    assert "holds a run made with --alternatives_exclude_spine=False (now True)" in message


def test_evaluate_resumes_a_folder_made_before_a_setting(tmp_path):
    out = tmp_path / "e"
    out.mkdir()
    a = evaluate.parse_args(["--model", "smollm2-135m", "--output_dir", str(out), "--benchmarks", "demo-arithmetic-test"])
    old = {k: getattr(a, k) for k in evaluate.GENERATION_SETTINGS if k != "student_thinking"}  # an older run's file
    (out / "settings.json").write_text(json.dumps(old))
    (out / "samples.jsonl").write_text("")
    assert evaluate.open_store(a) == (out, {})
    a.student_thinking = not evaluate.Args().student_thinking
    assert f"--student_thinking={evaluate.Args().student_thinking!r}" in one_line_exit(evaluate.open_store, a)
