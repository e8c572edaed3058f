"""User data files (CSV, JSONL) as rows, and the rules for their columns: one reader each,
shared by training, calibration, the parity gate and ``mpismoe-run``.

Standard library only (the runtime's import boundary). Every error is a ``ValueError`` (or
``FileNotFoundError``) naming the file and line, so a CLI can print it as one ``error: ...`` line.
"""

from __future__ import annotations

import csv
import io
import json
import math
import numbers
import sys
from collections.abc import Sequence
from pathlib import Path

Row = tuple[int, dict]  # (1-based line number in the file, the row's fields)


def _name(path: str | Path) -> str:
    return "<stdin>" if str(path) == "-" else str(path)


def _read_bytes(path: str | Path) -> bytes:
    if str(path) == "-":
        return sys.stdin.buffer.read()
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data file not found: {p}")
    try:
        return p.read_bytes()
    except OSError as e:
        raise ValueError(f"cannot read {p}: {e.strerror or e}") from None


def _decode(data: bytes, name: str) -> str:
    """UTF-8 text (a BOM is dropped); ValueError naming the line and byte that are not UTF-8."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ValueError(
            f"{name} line {line}: not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); "
            "save the file as UTF-8"
        ) from None


def read_jsonl(path: str | Path) -> list[Row]:
    """One JSON object per non-blank line (``-``: stdin); the whole file is checked first."""
    name = _name(path)
    rows = []
    for no, line in enumerate(_decode(_read_bytes(path), name).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{name} line {no}: not valid JSON ({e.msg}); JSONL holds one JSON object per line, "
                'e.g. {"text": "great phone"}'
            ) from None
        if not isinstance(obj, dict):
            raise ValueError(f"{name} line {no}: expected a JSON object")
        rows.append((no, obj))
    if not rows:
        raise ValueError(f"{name} holds no rows")
    return rows


def read_csv(path: str | Path) -> list[Row]:
    """The records of a UTF-8 CSV file with a header line; a row's line is where it ends."""
    name = _name(path)
    text = _decode(_read_bytes(path), name)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = []
    try:
        for row in reader:
            rows.append((reader.line_num, row))
    except csv.Error as e:
        raise ValueError(f"{name} line {reader.line_num}: not valid CSV ({e})") from None
    if not rows:
        raise ValueError(f"{name} holds no rows")
    return rows


def read_rows(path: str | Path) -> list[Row]:
    """The rows of a ``.csv``, ``.jsonl`` (or ``.json`` lines) file, or of stdin (``-``, JSONL)."""
    suffix = ".jsonl" if str(path) == "-" else Path(path).suffix.lower()
    if suffix == ".csv":
        return read_csv(path)
    if suffix in (".jsonl", ".json"):
        return read_jsonl(path)
    raise ValueError(f"{path}: unsupported data format {suffix!r}; use .csv or .jsonl")


def column(rows: Sequence[Row], name: str, source: str | Path) -> list:
    """Every row's ``name`` field; a row without it is an error naming its line."""
    values = []
    for no, row in rows:
        value = row.get(name)
        if value is None:
            raise ValueError(f"{source} line {no}: {name!r} missing (the row has {sorted(row)})")
        values.append(value)
    return values


def texts(rows: Sequence[Row], source: str | Path, name: str = "text") -> list[str]:
    """Every row's ``name`` field, which must be a string."""
    values = column(rows, name, source)
    for (no, _), value in zip(rows, values):
        if not isinstance(value, str):
            raise ValueError(f"{source} line {no}: {name!r} must be a string, got {type(value).__name__}")
    return values


def is_int(value) -> bool:
    """An integer (not a bool), or a string holding one (as CSV cells hold numbers)."""
    if isinstance(value, numbers.Integral):
        return not isinstance(value, bool)
    return isinstance(value, str) and value.strip().lstrip("-").isdigit()


def regression_targets(values: Sequence, where: Sequence[str] | None = None) -> list[float]:
    """Regression targets: each value a finite number (not a bool), or a string holding one (as
    CSV cells hold numbers). ``where[i]`` names ``values[i]`` in messages (default ``label #i``)."""
    out = []
    for i, value in enumerate(values):
        number = None
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None or not math.isfinite(number):
            place = where[i] if where is not None else f"label #{i}"
            raise ValueError(f"{place}: regression label {value!r} is not a finite number")
        out.append(number)
    return out


def label_ids(values: Sequence, labels: Sequence[str], where: Sequence[str] | None = None) -> list[int]:
    """Class ids of ``values``: a value equal to a label name is that label's index; otherwise
    an integer (or integer string) in ``[0, len(labels))`` is the id itself. ``where[i]`` names
    ``values[i]`` in messages (default ``label #i``)."""
    index = {str(name): i for i, name in enumerate(labels)}
    ids = []
    for i, value in enumerate(values):
        if str(value) in index and not isinstance(value, bool):
            ids.append(index[str(value)])
        elif is_int(value) and 0 <= int(value) < len(labels):
            ids.append(int(value))
        else:
            place = where[i] if where is not None else f"label #{i}"
            raise ValueError(
                f"{place}: label {value!r} is neither one of {list(labels)} nor a class id in [0, {len(labels)})"
            )
    return ids
