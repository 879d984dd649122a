"""Outcomes as rows of the ``messages`` table, in PostgreSQL's COPY text format.

The archive writes every outcome through COPY. Formatting the rows here, straight from the decoded
Outcome into one buffer per batch, costs a fraction of building tuples of Python values and letting
psycopg adapt them one by one (a datetime, a Jsonb wrapper and a dumper lookup per value).

COPY text format: one line per row, columns separated by tabs, ``\\N`` for NULL, and backslash, tab,
newline and carriage return escaped with a backslash.

Formatting never raises and stores what it can rather than have PostgreSQL refuse the row: a NUL (which
text and jsonb cannot hold) and a lone surrogate (which UTF-8 cannot encode) become U+FFFD, and a token
count outside ``bigint`` (a backend's number, up to 2**64 - 1 through msgpack) becomes NULL. The archive
dead-letters only the rows PostgreSQL still refuses.
"""

from __future__ import annotations

import functools
import re
import time

import msgspec

from llmq.pipeline.models import Outcome

COLUMNS = (
    "id",
    "level",
    "status",
    "tenant",
    "session_id",
    "backend",
    "model",
    "attempts",
    "request",
    "response",
    "error",
    "prompt_tokens",
    "completion_tokens",
    "enqueued_at",
    "started_at",
    "finished_at",
    "queue_wait_ms",
    "latency_ms",
    "errors",
    "first_token_ms",
    "batch_id",
    "custom_id",
)

NULL = b"\\N"
_SURROGATES = {c: "\ufffd" for c in range(0xD800, 0xE000)}
"""Code points UTF-8 cannot encode (Python holds a valid pair as one code point): each becomes U+FFFD."""
_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r", "\x00": "\ufffd"}) | _SURROGATES
_BIGINT = range(-(2**63), 2**63)
_JSON_NUL = re.compile(rb"(?<!\\)((?:\\\\)*)\\u0000")
"""A ``\\u0000`` escape in JSON text, not preceded by an odd number of backslashes (an escaped one)."""
_json = msgspec.json.Encoder()


def copy_rows(outcomes: list[Outcome], *, store_bodies: bool) -> bytes:
    """The rows of ``outcomes`` for ``COPY messages (COLUMNS) FROM STDIN``."""
    return b"".join([copy_row(o, store_bodies=store_bodies) for o in outcomes])


def copy_row(o: Outcome, *, store_bodies: bool) -> bytes:
    """One outcome's row, its line ending included."""
    m = o.message
    model = m.request.get("model")
    started = o.started_at
    return (
        b"\t".join(
            (
                m.id.encode(),
                _text(m.level),
                o.status.value.encode(),
                _text(m.tenant),
                _text(m.session_id),
                _text(o.backend),
                _text(model if isinstance(model, str) else None),
                b"%d" % m.attempts,
                _json_text(m.request) if store_bodies else NULL,
                _json_text(o.response) if store_bodies else NULL,
                _text(o.error),
                _bigint(o.prompt_tokens),
                _bigint(o.completion_tokens),
                _timestamp(m.enqueued_at),
                _timestamp(started),
                _timestamp(o.finished_at),
                NULL if started is None else repr((started - m.enqueued_at) * 1000).encode(),
                NULL if started is None else repr((o.finished_at - started) * 1000).encode(),
                _json_text(m.errors) if m.errors else NULL,
                NULL if o.first_token_ms is None else repr(o.first_token_ms).encode(),
                _text(m.batch_id),
                _text(m.custom_id),
            )
        )
        + b"\n"
    )


def _text(value: str | None) -> bytes:
    if value is None:
        return NULL
    if "\\" not in value and value.isprintable():  # the common case, checked in C: nothing to escape
        return value.encode()
    return value.translate(_ESCAPES).encode()


def _bigint(value: int | None) -> bytes:
    return b"%d" % value if value is not None and value in _BIGINT else NULL


def _json_text(value: object) -> bytes:
    if value is None:
        return NULL
    try:
        data = _json.encode(value)  # control characters come out escaped: only backslashes need doubling
    except UnicodeEncodeError:
        data = _json.encode(_without_surrogates(value))
    if b"\\u0000" in data:
        data = _JSON_NUL.sub(rb"\1\\ufffd", data)
    return data.replace(b"\\", b"\\\\")


def _without_surrogates(value: object) -> object:
    """``value`` with each lone surrogate in its strings (keys too) replaced by U+FFFD."""
    if isinstance(value, str):
        return value.translate(_SURROGATES)
    if isinstance(value, dict):
        return {_without_surrogates(k): _without_surrogates(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_surrogates(v) for v in value]
    return value


def _timestamp(seconds: float | None) -> bytes:
    if seconds is None:
        return NULL
    whole, micros = divmod(round(seconds * 1_000_000), 1_000_000)
    return b"%s.%06d+00" % (_second(whole), micros)


@functools.lru_cache(maxsize=4096)
def _second(whole: int) -> bytes:
    """The outcomes of a batch share a few seconds: each is formatted once."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(whole)).encode()
