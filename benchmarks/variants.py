"""``NAME=JSON`` on a benchmark's command line: a named variant, given as a JSON object of fields."""

from __future__ import annotations

import json


def parse_variant(text: str, prog: str, known: dict[str, dict] | None = None) -> tuple[str, dict]:
    """``(name, fields)`` of ``NAME=JSON``, or of a name in ``known``; a bad one exits with one
    line naming what is wrong (``prog``: the benchmark's name)."""
    if known and text in known:
        return text, known[text]
    name, sep, spec = text.partition("=")
    if not sep:
        names = f"neither a known name {sorted(known)} nor" if known else "not"
        raise SystemExit(f"{prog}: variant {text!r} is {names} NAME=JSON")
    try:
        value = json.loads(spec)
    except json.JSONDecodeError as e:
        raise SystemExit(f"{prog}: variant {name!r}: bad JSON ({e})") from None
    if not isinstance(value, dict):
        raise SystemExit(f"{prog}: variant {name!r}: JSON must be an object")
    return name, value
