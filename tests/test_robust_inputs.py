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


# ---- second trial: jsonl repair keeps every byte; settings / config / dataset / checkpoint flags -------------------
def test_read_jsonl_repair_only_cuts_the_torn_last_line(tmp_path, capsys):
    from pwopsd.folders import read_jsonl

    p = tmp_path / "s.jsonl"
    good = b'{"a": "caf\xc3\xa9"}\r\n\n{"b": "x\xe2\x80\xa8y"}\n'  # CRLF, a blank line, U+2028 inside a string
    p.write_bytes(good + b'{"c": 3, "d')
    assert read_jsonl(p, repair=True) == [{"a": "caf\u00e9"}, {"b": "x\u2028y"}]
    assert p.read_bytes() == good and "dropped 1 unreadable line" in capsys.readouterr().out
    p.write_bytes(b'{"a": 1}\n{"b": 2}')  # complete, only its newline missing: kept, newline added
    assert read_jsonl(p, repair=True) == [{"a": 1}, {"b": 2}] and p.read_bytes() == b'{"a": 1}\n{"b": 2}\n'


@pytest.mark.parametrize("middle,problem", [
    (b'{"b": "caf\xe9"}', "line 2 is not UTF-8 text (byte 0xe9)"),  # was rewritten with U+FFFD
    (b'{"b": ', "line 2 is not valid JSON (Expecting value)"),
    (b'[1, 2]', "line 2 is not a JSON object (got list)"),
])
def test_read_jsonl_damaged_middle_line_leaves_the_file(tmp_path, middle, problem):
    from pwopsd.folders import read_jsonl

    p = tmp_path / "s.jsonl"
    raw = b'{"a": 1}\n' + middle + b'\n{"c": 3}\n{"d": '
    p.write_bytes(raw)
    message = one_line_exit(lambda: read_jsonl(p, repair=True, prog="x.py"))
    assert message.startswith(f"x.py: {p}: {problem} (an interrupted run leaves only the last line broken): "
                              f"fix or delete that line")
    with pytest.raises(ValueError, match="line 2"):  # without prog: a ValueError, for library callers
        read_jsonl(p)
    assert p.read_bytes() == raw


def test_damaged_stores_stop_before_a_model_loads(tmp_path):
    from pwopsd.folders import check_run_folder, trim_metrics

    bad = b'{"a": 1}\n{"b": "caf\xe9"}\n'
    out = tmp_path / "e"  # evaluate.py: open_store runs before the model loads
    out.mkdir()
    a = evaluate.parse_args(["--model", "smollm2-135m", "--output_dir", str(out), "--benchmarks", "demo-arithmetic-test"])
    (out / "settings.json").write_text(json.dumps({k: getattr(a, k) for k in evaluate.GENERATION_SETTINGS}))
    (out / "samples.jsonl").write_bytes(bad)
    assert one_line_exit(evaluate.open_store, a).startswith(f"evaluate.py: {out / 'samples.jsonl'}: line 2 is not UTF-8")
    assert (out / "samples.jsonl").read_bytes() == bad
    d = tmp_path / "d"  # diagnose.py: checked in parse_args
    d.mkdir()
    (d / "config.json").write_text(json.dumps({k: v for k, v in vars(diagnose.Args()).items() if k in diagnose.EXPERIMENT_FLAGS}))
    (d / "spines.jsonl").write_bytes(bad)
    assert one_line_exit(diagnose.parse_args, ["--output_dir", str(d)]).startswith(
        f"diagnose.py: {d / 'spines.jsonl'}: line 2 is not UTF-8")
    t = tmp_path / "t"  # train.py: a resume checks metrics.jsonl with the output folder
    t.mkdir()
    (t / "metrics.jsonl").write_bytes(bad)
    args = SimpleNamespace(output_dir=str(t), resume_from_checkpoint="latest", overwrite_output_dir=False)
    assert one_line_exit(check_run_folder, args).startswith(f"train.py: {t / 'metrics.jsonl'}: line 2 is not UTF-8")
    assert one_line_exit(trim_metrics, str(t), 3).startswith(f"train.py: {t / 'metrics.jsonl'}: line 2")
    assert (t / "metrics.jsonl").read_bytes() == bad


@pytest.mark.parametrize("text", ["[1]", "null", '"x"'])
def test_check_same_settings_not_an_object(tmp_path, text):
    path = tmp_path / "settings.json"
    path.write_text(text)
    assert one_line_exit(lambda: check_same_settings(path, {"top_p": 1.0}, "x.py", write=False)) == \
        f"x.py: {path}: expected the {{flag: value}} settings of an earlier run, got {type(json.loads(text)).__name__}; " \
        f"use another --output_dir"


@pytest.mark.parametrize("yaml_text,key", [("1: 2\n", "1"), ("null: 3\n", "None"), ("dataset: x\ntrue: 1\n", "True")])
def test_config_key_not_a_string(tmp_path, yaml_text, key):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text)
    assert one_line_exit(lambda: parse_config(_Flags, ["--config", str(cfg)], prog="x.py")) == \
        f"x.py: {cfg}: key {key} is not a flag name (expected lines of `flag: value`)"


def test_folder_and_empty_names(files):
    assert one_line_exit(data.main, ["--dataset", ""]) == \
        "data.py: --dataset '': empty; name a .jsonl/.json/.parquet file, a dataset folder or a Hub id"
    (files / "cfg").mkdir()
    assert one_line_exit(lambda: parse_config(_Flags, ["--config", "cfg"], prog="x.py")) == \
        "x.py: --config cfg: is a folder; pass a YAML file"
    import train

    (files / "ckpt.bin").write_bytes(b"x")
    assert one_line_exit(train.parse_args, ["--resume_from_checkpoint", "ckpt.bin", "--output_dir", "o"]) == \
        "train.py: --resume_from_checkpoint ckpt.bin: a file, not a checkpoint folder (checkpoint-<step>/)"
    (files / "b.jsonl").mkdir()
    assert evaluate.benchmark_problem(["b.jsonl"]) == "b.jsonl is a folder; pass a .jsonl/.json/.parquet file"


def test_dataset_folder_loads_or_fails_in_one_line(files, monkeypatch):
    # a folder is a dataset in datasets' layout (train.jsonl + test.jsonl, as a cloned Hub dataset): kept
    monkeypatch.setattr("datasets.config.HF_DATASETS_CACHE", files / "cache")  # not the user's cache
    (files / "ds").mkdir()
    (files / "ds" / "train.jsonl").write_text('{"problem": "1+1", "solution": "\\\\boxed{2}"}\n')
    assert [r["problem"] for r in data.load_problems("ds", "train", verbose=False)] == ["1+1"]
    (files / "mixed").mkdir()  # files with other columns: datasets' DatasetGenerationError was a traceback
    (files / "mixed" / "a.jsonl").write_text('{"problem": "1+1", "solution": "2"}\n')
    (files / "mixed" / "b.jsonl").write_text('{"q": "1+1", "x": 3}\n')
    assert one_line_exit(data.main, ["--dataset", "mixed"]) == (
        "data.py: --dataset mixed: is a folder that datasets cannot load as split 'train' (Couldn't cast ... because "
        "column names don't match); pass a .jsonl/.json/.parquet file or a Hub id")
    (files / "none.jsonl").mkdir()  # a folder named like a file: was "no such file"
    assert one_line_exit(data.main, ["--dataset", "none.jsonl"]).startswith(
        "data.py: --dataset none.jsonl: is a folder that datasets cannot load as split 'train' (")


def test_upper_case_extensions(files):
    (files / "T.JSONL").write_bytes((files / "two.jsonl").read_bytes())
    assert [r["problem"] for r in data.load_problems("T.JSONL", verbose=False)] == ["1+1", "2+2"]
    assert evaluate.benchmark_problem(["T.JSONL"]) is None


def test_os_errors_are_one_line(files, monkeypatch):
    def denied(*a, **k):
        raise PermissionError("two.jsonl: cannot read (Permission denied)")

    monkeypatch.setattr(diagnose, "load_problems", denied)
    assert one_line_exit(diagnose.load_inputs, diagnose.Args(dataset="two.jsonl")) == \
        "diagnose.py: --dataset: two.jsonl: cannot read (Permission denied)"
    monkeypatch.setattr(evaluate, "load_problems", denied)
    a = evaluate.Args(model="smollm2-135m", benchmarks=["two.jsonl"])
    assert one_line_exit(evaluate.load_benchmark, "two.jsonl", a) == \
        "evaluate.py: --benchmarks two.jsonl: cannot read (Permission denied)"  # the path once, not twice
    real = type(files).read_bytes

    def read_bytes(self):  # root reads a chmod 000 file: the error is simulated
        if self.name == "two.jsonl":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(type(files), "read_bytes", read_bytes)
    assert one_line_exit(data.main, ["--dataset", "two.jsonl"]) == "data.py: --dataset two.jsonl: cannot read (Permission denied)"


def test_evaluate_names_a_benchmark_file_once(files):
    a = evaluate.Args(model="smollm2-135m", benchmarks=["empty.jsonl"])
    assert one_line_exit(evaluate.load_benchmark, "empty.jsonl", a) == "evaluate.py: --benchmarks empty.jsonl: no records"
