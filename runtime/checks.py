"""Argument checks shared by the runtime's API and the command lines (standard library only)."""

from __future__ import annotations


def positive_int(name: str, value, optional: bool = False):
    """``value`` if it is an int >= 1 (or None when ``optional``); else ValueError naming ``name``."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value
