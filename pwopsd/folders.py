"""Output folders, resume guards and checkpoints: nothing a run has written is ever mixed, lost or half-written.

The rule, the same for train.py, evaluate.py and diagnose.py: --output_dir must be a folder (or a path where one can
be made) that this user can write, checked before anything loads; a folder holding another run's files is never mixed
into -- it is continued (a resume, whose settings must match), refused, or, with --overwrite_output_dir true, cleared
of that script's own files (nothing else) once every check has passed and the inputs have loaded.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

from pwopsd.cli import fail
from pwopsd.ema import save_ema_teacher

PROG = "train.py"


def _jsonl_record(line: bytes):
    """``(record, None)`` for a line holding a JSON object, else ``(None, what is wrong)``."""
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as e:
        return None, f"is not UTF-8 text (byte 0x{line[e.start]:02x})"
    except json.JSONDecodeError as e:
        return None, f"is not valid JSON ({e.msg})"
    return (record, None) if isinstance(record, dict) else (None, f"is not a JSON object (got {type(record).__name__})")


def read_jsonl(path, repair: bool = False, prog: str | None = None) -> list[dict]:
    """The records of a jsonl file written line by line (``[]`` if there is none).

    Only the last line can be cut short by a killed run (every line is appended whole, then flushed): an unreadable
    text after the last newline is skipped, and with ``repair=True`` cut off the file (truncated in place, so the
    next append starts on a fresh line; a complete record lacking only its newline gets one). No other byte is ever
    rewritten. Blank lines are skipped.
    Raises:
        ValueError (SystemExit ``<prog>: ...`` when ``prog`` is given): one line naming the file and line when a
        line before the last newline is not UTF-8, not JSON or not an object -- damage from outside, which only
        the user can judge; the file is left as it is.
    """
    path = Path(path)
    if not path.is_file():
        return []
    raw = path.read_bytes()
    *complete, tail = raw.split(b"\n")  # "\n" only: a record's text may hold other line separators
    records = []
    for i, line in enumerate(complete, 1):
        if line.strip():
            record, problem = _jsonl_record(line)
            if problem is not None:
                message = (f"{path}: line {i} {problem} (an interrupted run leaves only the last line broken): "
                           f"fix or delete that line; the file is left as it is")
                if prog is not None:
                    fail(prog, message)
                raise ValueError(message)
            records.append(record)
    last = _jsonl_record(tail)[0] if tail.strip() else None
    if last is not None:
        records.append(last)
    if repair and tail:
        if last is not None:
            with open(path, "ab") as f:
                f.write(b"\n")
        else:
            if tail.strip():
                print(f"[data] {path}: dropped 1 unreadable line left by an interrupted run (the last, cut short)")
            os.truncate(path, len(raw) - len(tail))
    return records


def check_same_settings(path, now: dict, prog: str, *, active: bool = True,
                        hint: str = "use another --output_dir", write: bool = True, defaults: dict | None = None):
    """Refuse to continue a run whose ``path`` (a json of flag: value) records other settings; then write ``now``.

    ``active=False`` skips the comparison (nothing to continue); ``write=False`` only compares (write later,
    once the run's inputs have loaded). ``defaults`` (flag -> default, e.g. ``vars(Args())``): a flag that ``path``
    lacks -- the run was made before the flag existed -- had its default then (without ``defaults``: None).
    Raises SystemExit naming every differing flag:
    ``--output_dir D holds a run made with --top_p=0.95 (now 1.0); use another --output_dir``.
    """
    path = Path(path)
    if active and path.is_file():
        try:
            before = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            fail(prog, f"{path}: unreadable settings of an earlier run; {hint}")
        if not isinstance(before, dict):  # valid JSON, but not the {flag: value} object a run writes
            fail(prog, f"{path}: expected the {{flag: value}} settings of an earlier run, got {type(before).__name__}; {hint}")
        before = {**{k: (defaults or {}).get(k) for k in now}, **before}  # a flag the old run lacked: its default
        diff = [f"--{k}={before[k]!r} (now {v!r})" for k, v in now.items() if before[k] != v]
        if diff:
            fail(prog, f"--output_dir {path.parent} holds a run made with {', '.join(diff)}; {hint}")
    if write:
        path.write_text(json.dumps(now, indent=1) + "\n")


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


# What a train.py run writes into --output_dir (all that --overwrite_output_dir true deletes; "pw-opsd" = tracker logs,
# "eval" = evaluation during training).
TRAIN_RUN_FILES = ("metrics.jsonl", "checkpoint-*", "pw-opsd", "eval")

# Arguments that may differ when a run is resumed: run length and checkpoint cadence (a new --max_steps also
# stretches or shortens a decaying learning-rate schedule), where things are written and logged, and knobs
# that change memory or speed but not the numbers (micro-batch size: the step's gradient is the same however
# it is split). Every other argument defines the run (data order, samples, loss, model, optimiser) and must
# match the checkpoint's.
MAY_CHANGE_ON_RESUME = ("max_steps", "allow_cpu", "vllm_sleep", "save_steps", "output_dir", "resume_from_checkpoint",
                        "overwrite_output_dir", "config", "report_to", "verbose", "per_device_train_batch_size", "gradient_checkpointing",
                        "loss_impl", "loss_chunk_size", "gpu_memory_utilization", "kv_cache_gib", "trust_remote_code",
                        # evaluation during training reads the policy, it does not change it
                        "eval_steps", "eval_benchmarks", "eval_n", "eval_limit", "eval_temperature", "eval_top_p",
                        "eval_max_new_tokens", "eval_thinking",
                        "grading")  # the metrics' grading rule: what is logged, not what is trained


def check_run_folder(args) -> str | None:
    """Before anything loads: ``--output_dir`` is a writable folder that holds no other run -- unless the run is
    resumed (its checkpoint's arguments must then match, see ``check_resume_args``) or
    ``--overwrite_output_dir true`` (cleared later, in ``setup``). Returns the checkpoint to resume from, or None.
    Raises SystemExit with one line."""
    existing = check_output_dir(args.output_dir, PROG, TRAIN_RUN_FILES)
    resume = args.resume_from_checkpoint
    if resume and args.overwrite_output_dir:
        fail(PROG, "--resume_from_checkpoint and --overwrite_output_dir true contradict each other: choose one")
    if existing and not resume and not args.overwrite_output_dir:
        shown = ", ".join(existing[:4]) + (", ..." if len(existing) > 4 else "")
        fail(PROG, f"--output_dir {args.output_dir} holds another run ({shown}): continue it with "
                   f"--resume_from_checkpoint latest, clear it with --overwrite_output_dir true, or use another --output_dir")
    if resume:  # the metrics log a resume trims: a damaged line stops it now, not after the model loads
        read_jsonl(Path(args.output_dir) / "metrics.jsonl", prog=PROG)
    checkpoint = loadable_checkpoint(args.output_dir) if resume == "latest" else resume
    if checkpoint is None:
        return None
    if resume != "latest" and (problem := damaged_file(checkpoint)) is not None:
        fail(PROG, f"--resume_from_checkpoint {checkpoint}: {problem}; resume from another checkpoint "
                   f"(--resume_from_checkpoint latest takes the newest loadable one)")
    if not (Path(checkpoint) / "trainer_state.json").is_file():
        fail(PROG, f"--resume_from_checkpoint {checkpoint}: no trainer_state.json (not a complete checkpoint)")
    if existing and Path(checkpoint).resolve().parent != Path(args.output_dir).resolve():
        fail(PROG, f"--resume_from_checkpoint {checkpoint} is not in --output_dir {args.output_dir}, which holds "
                   f"another run: use an empty --output_dir")
    check_resume_args(checkpoint, args)
    return checkpoint


def _shown(value) -> str:
    """An argument's value as it is typed on the command line."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return str(value)


def check_resume_args(checkpoint: str, args):
    """Refuse to resume ``checkpoint`` with other run-defining arguments than it was made with (every argument
    not in ``MAY_CHANGE_ON_RESUME``; arguments the checkpoint did not record are not compared). Raises
    SystemExit with one line listing each difference as ``--batch_size 8 -> 4`` (checkpoint -> now)."""
    try:
        saved = json.loads((Path(checkpoint) / "trainer_state.json").read_text())["args"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        fail(PROG, f"--resume_from_checkpoint {checkpoint}: trainer_state.json holds no readable args")
    now = dataclasses.asdict(args)
    diff = [f"--{k} {_shown(saved[k])} -> {_shown(v)}" for k, v in now.items()
            if k in saved and k not in MAY_CHANGE_ON_RESUME and saved[k] != v]
    if diff:
        fail(PROG, f"--resume_from_checkpoint {checkpoint} was made with other arguments: {', '.join(diff)} "
                   f"(these define the run; to change them start a new --output_dir)")


def trim_metrics(output_dir: str, step: int):
    """Drop the lines of ``<output_dir>/metrics.jsonl`` logged after ``step`` (they are re-run now), and any line
    an interrupted write left torn; rewritten through a temporary file. No file: nothing to do."""
    log = Path(output_dir) / "metrics.jsonl"
    if not log.is_file():
        return
    kept = [r for r in read_jsonl(log, prog=PROG) if isinstance(r.get("step"), int) and r["step"] <= step]
    tmp = log.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    tmp.replace(log)


# Checkpoints: <output_dir>/checkpoint-<step>/, written to a temporary folder and renamed when complete
def latest_checkpoint(output_dir: str) -> str | None:
    done = [p for p in Path(output_dir).glob("checkpoint-*") if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").is_file()]
    return str(max(done, key=lambda p: int(p.name.split("-")[-1]))) if done else None


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


def loadable_checkpoint(output_dir: str, say=None) -> str | None:
    """The newest complete checkpoint of ``output_dir`` whose files load (``damaged_file``); each damaged newer one
    is skipped with a line through ``say``. None when there is no checkpoint; exits with one line when every one is
    damaged (nothing is deleted: starting over is the user's choice)."""
    done = sorted((p for p in Path(output_dir).glob("checkpoint-*") if p.name.split("-")[-1].isdigit()
                   and (p / "trainer_state.json").is_file()), key=lambda p: -int(p.name.split("-")[-1]))
    for ckpt in done:
        problem = damaged_file(ckpt)
        if problem is None:
            return str(ckpt)
        if say is not None:
            say(f"[train] --resume_from_checkpoint latest: skipping {ckpt}: {problem}")
    if done:
        fail(PROG, f"--resume_from_checkpoint latest: every checkpoint in {output_dir} is damaged (the newest, {done[0]}: "
                   f"{damaged_file(done[0])}); start over with --overwrite_output_dir true")
    return None


def save_checkpoint(accelerator, model, args, step: int, ema: list | None = None):
    """``<output_dir>/checkpoint-<step>/``: accelerate's state (trainable weights, optimizer, scheduler, RNG), the
    student as a peft adapter (``adapter/``) or model, ``trainer_state.json``, and with ``ema`` the EMA teacher
    (``ema_adapter/``, float32). Written to ``checkpoint-<step>.tmp`` and renamed when complete."""
    final = Path(args.output_dir) / f"checkpoint-{step}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    # Optimizer, scheduler, RNG and the trainable weights (the pre-hook below drops frozen base weights).
    with fsdp_trainable_only(accelerator, model):
        accelerator.save_state(str(tmp), **({"exclude_frozen_parameters": True} if accelerator.state.deepspeed_plugin else {}))
    state_dict = accelerator.get_state_dict(model)  # gathers ZeRO-3 / FSDP shards; collective
    if accelerator.is_main_process:  # peft keeps only the adapter's tensors of the state dict
        # Only the student adapter: the EMA teacher is saved from its float32 masters below.
        accelerator.unwrap_model(model).save_pretrained(tmp / ("adapter" if args.use_lora else "model"), state_dict=state_dict,
                                                        **({"selected_adapters": ["default"]} if args.use_lora else {}))
        if ema is not None:
            save_ema_teacher(ema, tmp / "ema_adapter", tmp / "adapter" / "adapter_config.json")
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "args": dataclasses.asdict(args)}, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    accelerator.wait_for_everyone()


@contextlib.contextmanager
def fsdp_trainable_only(accelerator, model):
    """Under FSDP: accelerate's ``save_state`` / ``load_state`` write / read the model's trainable tensors only.

    accelerate saves an FSDP model (a torch distributed checkpoint of the *whole* state dict) before the
    ``register_save_state_pre_hook`` hooks run, so ``keep_trainable`` cannot drop the frozen base (~8 GB for
    Qwen3-4B per checkpoint). Inside this block its FSDP model save / load are replaced by the same checkpoint
    format (``pytorch_model_fsdp_<i>/``, any process count) restricted to the parameters with
    ``requires_grad``; loading reads those names only, so older whole-model checkpoints still resume.
    Elsewhere (DDP, DeepSpeed): nothing changes."""
    if accelerator.distributed_type.name != "FSDP":
        yield
        return
    import accelerate.accelerator as acc_module
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    names = {n for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad}

    def trainable(m):
        return {k: v for k, v in get_model_state_dict(m).items() if k in names}

    def save(_plugin, _acc, m, output_dir, model_index=0, *args, **kwargs):
        dcp.save(trainable(m), checkpoint_id=os.path.join(output_dir, f"pytorch_model_fsdp_{model_index}"))

    def load(_plugin, _acc, m, input_dir, model_index=0, *args, **kwargs):
        state = trainable(m)
        dcp.load(state, checkpoint_id=os.path.join(input_dir, f"pytorch_model_fsdp_{model_index}"))
        set_model_state_dict(m, state, options=StateDictOptions(strict=False))

    saved = acc_module.save_fsdp_model, acc_module.load_fsdp_model
    acc_module.save_fsdp_model, acc_module.load_fsdp_model = save, load
    try:
        yield
    finally:
        acc_module.save_fsdp_model, acc_module.load_fsdp_model = saved


def run_summary(args, start_step: int, seconds: float, build_seconds: float = 0.0) -> str:
    """The last console line: the steps run, the wall time (``build_seconds``, the warm start's build, apart) and
    what the output folder now holds."""
    out = Path(args.output_dir)
    ckpts = sorted((p.name for p in out.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()), key=lambda n: int(n[11:]))
    files = ckpts + ["metrics.jsonl"] + [f"{name}/ ({what})" for name, what in (("eval", "evaluations"), ("pw-opsd", "tracker logs"))
                                         if (out / name).is_dir()]
    steps = f"steps {start_step + 1}-{args.max_steps}" if start_step < args.max_steps else f"no step after {start_step}"
    def took(s):
        return f"{int(s // 60)} min {s % 60:.0f} s" if s >= 60 else f"{s:.0f} s"

    build = f" (+ {took(build_seconds)} building the warm start --model {args.model} once)" if build_seconds else ""
    return f"[train] {steps} done in {took(seconds)}{build}; {out}: {', '.join(files)}"


def saved_lines(path) -> int:
    """Lines of a jsonl file written line by line (0 when there is none): what a Ctrl-C line says is saved."""
    path = Path(path)
    return sum(1 for line in path.read_bytes().split(b"\n") if line.strip()) if path.is_file() else 0

