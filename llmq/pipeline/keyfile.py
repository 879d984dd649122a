"""A file of API keys (``server.api_keys_file``): one key a line, optionally followed by the tenant it belongs
to (``<key> <tenant>``, separated by spaces or tabs); blank lines and ``#`` comments skipped. A key belongs to
one tenant, or to none: a key given twice with two owners (in the file, or in the file and the config) is
refused, as the owner a request gets would depend on the order of the lines."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple


class KeyLine(NamedTuple):
    key: str
    tenant: str | None
    line: int


def read_key_file(path: str | Path, config_keys: Sequence[tuple[str, str | None]] = ()) -> list[KeyLine]:
    """The keys in ``path``, each with its tenant (None: the line names none). OSError (or UnicodeDecodeError)
    when it cannot be read; ValueError naming the line (never the key) when a line has more than two words
    (a key with a space in it would otherwise be read as a key and a tenant), or gives a key another owner
    than an earlier line or ``config_keys`` (the config's keys and their tenants) give it."""
    owners: dict[str, tuple[str | None, str]] = {k: (t, "the config") for k, t in config_keys}
    keys: list[KeyLine] = []
    # utf-8-sig: a byte order mark (Windows editors write one) would otherwise make the first line a key
    for number, text in enumerate(Path(path).read_text(encoding="utf-8-sig").splitlines(), 1):
        words = text.split()
        if not words or words[0].startswith("#"):
            continue
        if len(words) > 2:
            raise ValueError(f"line {number}: expected '<key>' or '<key> <tenant>', found {len(words)} words")
        entry = KeyLine(words[0], words[1] if len(words) == 2 else None, number)
        first = owners.setdefault(entry.key, (entry.tenant, f"line {entry.line}"))
        if first[0] != entry.tenant:  # (named by where, never by a word of a line: the words may be keys)
            raise ValueError(
                f"line {number}: its key has another owner in {first[1]}; a key belongs to one tenant (or none)"
            )
        keys.append(entry)
    return keys
