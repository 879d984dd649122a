"""Durations in the seed's string form ("100ms", "30s", "5m", "1h30m", "7d"), parsed once into seconds."""

from __future__ import annotations

import re

_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")


def parse_duration(text: str) -> float:
    """Return the duration in seconds; raise ValueError for anything but concatenated ``<number><unit>``."""
    s = text.strip()
    if not s:
        raise ValueError(f"invalid duration {text!r}")
    pos, total = 0, 0.0
    for m in _PART.finditer(s):
        if m.start() != pos:
            raise ValueError(f"invalid duration {text!r}")
        total += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
        pos = m.end()
    if pos != len(s):
        raise ValueError(f"invalid duration {text!r}")
    return total


def format_duration(seconds: float) -> str:
    """The inverse of parse_duration for display: 0.1 -> "100ms", 30 -> "30s", 300 -> "5m"."""
    if seconds < 1:
        return f"{round(seconds * 1000)}ms"
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"
