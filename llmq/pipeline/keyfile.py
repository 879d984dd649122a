"""A file of API keys (``server.api_keys_file``): one key a line, optionally followed by the tenant it belongs
to (``<key> <tenant>``, separated by spaces or tabs); blank lines and ``#`` comments skipped."""

from __future__ import annotations

from pathlib import Path


def read_key_file(path: str | Path) -> list[tuple[str, str | None]]:
    """The keys in ``path``, each with its tenant (None: the line names none). OSError (or
    UnicodeDecodeError) when it cannot be read; ValueError naming the line when a line has more than two
    words (a key with a space in it would otherwise be read as a key and a tenant)."""
    keys: list[tuple[str, str | None]] = []
    # utf-8-sig: a byte order mark (Windows editors write one) would otherwise make the first line a key
    for number, line in enumerate(Path(path).read_text(encoding="utf-8-sig").splitlines(), 1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if len(words) > 2:
            raise ValueError(f"line {number}: expected '<key>' or '<key> <tenant>', found {len(words)} words")
        keys.append((words[0], words[1] if len(words) == 2 else None))
    return keys
