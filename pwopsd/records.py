"""Reading problem rows: local .jsonl / .json / .parquet files or Hub datasets, and finding their fields.

Used by data.load_problems; a dotted field name reads a nested field, a chat column (a list of
{"role", "content"} messages) gives its first user message or its last assistant message.
"""
from __future__ import annotations

import json
from pathlib import Path

from pwopsd.demo import DEMO_SOURCES

_USER, _ASSISTANT = ("user", "human"), ("assistant", "gpt", "model", "bot")


FILE_TYPES = (".jsonl", ".json", ".parquet")


def read_text(path, what: str | None = None) -> str:
    """A UTF-8 text file (a leading BOM, as Windows editors write it, is dropped) -> str.

    Raises ValueError naming ``what`` (default: the path) and the line of the first byte that is not UTF-8:
    ``x.jsonl: line 3 is not UTF-8 text (byte 0xff); save the file as UTF-8``. An OSError (PermissionError, ...)
    keeps its type, its message one line naming the file: ``x.jsonl: cannot read (Permission denied)``."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise type(e)(f"{what or path}: cannot read ({e.strerror or type(e).__name__})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:  # the codec's own message names neither the file nor the line
        line = raw[:e.start].count(b"\n") + 1
        utf16 = " (it is UTF-16)" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else ""  # Windows' "Unicode"
        raise ValueError(f"{what or path}: line {line} is not UTF-8 text (byte 0x{raw[e.start]:02x}){utf16}; "
                         f"save the file as UTF-8") from None


def _read_rows(source: str, split: str) -> list[dict]:
    """The rows of a local file, a local dataset folder (``datasets``' layout: e.g. ``train.jsonl`` + ``test.jsonl``,
    ``split`` picks the file) or a Hub dataset; raises FileNotFoundError / ValueError (one line naming the file or
    folder and, where it applies, the line or record) or ConnectionError (an unreachable Hub)."""
    if not source.strip():  # datasets would fail with an IndexError
        raise ValueError(f"{source!r}: empty; name a {'/'.join(FILE_TYPES)} file, a dataset folder or a Hub id")
    path = Path(source)
    suffix = path.suffix.lower()  # x.JSONL is a jsonl file too
    if suffix not in FILE_TYPES and path.is_file():  # an existing file is never looked up on the Hub
        raise ValueError(f"{source}: unsupported file type; use {'/'.join(FILE_TYPES)}")
    if suffix in FILE_TYPES and not path.is_dir():
        if not path.is_file():
            raise FileNotFoundError(f"{source}: no such file")
        if suffix == ".jsonl":
            rows = []
            for i, line in enumerate(read_text(path).split("\n"), 1):  # "\n" only: U+2028 may sit inside a string
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{source}:{i}: not valid JSON ({e.msg})") from None
                    _check_record(rows[-1], f"{source}:{i}")
            return rows
        if suffix == ".json":
            try:
                data = json.loads(read_text(path))
            except json.JSONDecodeError as e:
                raise ValueError(f"{source}:{e.lineno}: not valid JSON ({e.msg})") from None
            if isinstance(data, dict):  # {"data": [...]} or {"train": [...]}; {} holds no records
                data = data.get(split) or data.get("data") or next(iter(data.values()), [])
            if not isinstance(data, list):
                raise ValueError(f"{source}: expected a list of records")
            for i, row in enumerate(data):
                _check_record(row, f"{source}: record {i}")
            return data
        import pandas as pd

        try:
            return pd.read_parquet(path).to_dict("records")
        except (OSError, ValueError) as e:  # pyarrow's message does not name the file
            raise ValueError(f"{source}: not a readable parquet file ({(str(e).strip() or type(e).__name__).splitlines()[0]})") from None
    import datasets  # Hub id (or a local dataset folder)
    from datasets.exceptions import DatasetsError

    try:
        return list(datasets.load_dataset(source, split=split))
    except ConnectionError as e:  # offline (HF_HUB_OFFLINE) or no network: one line, with what to do instead
        cause = (str(e).strip() or type(e).__name__).splitlines()[0]
        raise ConnectionError(f"cannot download {source!r} from the Hugging Face Hub ({cause}); use a local "
                              f".jsonl/.json/.parquet copy of it, or an offline built-in: {', '.join(DEMO_SOURCES)}") from None
    except (OSError, ValueError, DatasetsError) as e:
        if not path.is_dir():
            raise
        # datasets' own message is several lines, or only "An error occurred" with the reason in its cause
        lines = (str(e.__cause__ or e).strip() or type(e).__name__).splitlines()
        raise ValueError(f"{source}: is a folder that datasets cannot load as split {split!r} ("
                         f"{lines[0] if len(lines) == 1 else lines[0] + ' ... ' + lines[-1]}); pass a "
                         f"{'/'.join(FILE_TYPES)} file or a Hub id") from None


def _check_record(row, where: str):
    """A record must be a JSON object (``{"problem": ...}``); a list or a bare value is a ValueError naming ``where``."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object {{\"problem\": ...}}, got {type(row).__name__} {str(row)[:40]}")


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


def no_usable_records(source: str, n: int, empty: dict, fields: dict, answer_fields=()) -> str:
    """The one-line error of a source none of whose ``n`` records is usable, naming the field that was empty in
    most of them (``empty``: field -> count) and the column it was read from (``fields``: field -> column or None),
    or that there is no answer column (``answer_fields``: the columns tried)."""
    what = max(empty, key=empty.get)
    if what == "answer" and fields["answer"] is None:
        return (f"{source}: no usable records: none of the {n} has an answer -- there is no answer column (tried "
                f"{', '.join(answer_fields)}) and the solutions hold no \\boxed{{}}; set --answer_field")
    column = f"column {fields[what]!r}" if fields[what] else f"no {what} column"
    return f"{source}: no usable records: the {what} is empty in {empty[what]} of the {n} ({column}; set --{what}_field)"
