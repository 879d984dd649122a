"""A file of API keys (``server.api_keys_file``): one key a line; blank lines and ``#`` comments skipped."""

from __future__ import annotations

from pathlib import Path


def read_key_file(path: str | Path) -> list[str]:
    """The keys in ``path``. OSError (or UnicodeDecodeError) when it cannot be read."""
    keys = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        key = line.strip()
        if key and not key.startswith("#"):
            keys.append(key)
    return keys
