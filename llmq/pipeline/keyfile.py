"""A file of API keys (``server.api_keys_file``): one key a line; blank lines and ``#`` comments skipped."""

from __future__ import annotations

from pathlib import Path


def read_key_file(path: str | Path) -> list[str]:
    """The keys in ``path``. OSError (or UnicodeDecodeError) when it cannot be read."""
    keys = []
    # utf-8-sig: a byte order mark (Windows editors write one) would otherwise make the first line a key
    for line in Path(path).read_text(encoding="utf-8-sig").splitlines():
        key = line.strip()
        if key and not key.startswith("#"):
            keys.append(key)
    return keys
