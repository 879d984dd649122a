"""Outcomes as rows of the ``messages`` table, in PostgreSQL's COPY text format.

The archive writes every outcome through COPY. Formatting the rows here, straight from the decoded
Outcome into one buffer per batch, costs a fraction of building tuples of Python values and letting
psycopg adapt them one by one (a datetime, a Jsonb wrapper and a dumper lookup per value).

COPY text format: one line per row, columns separated by tabs, ``\\N`` for NULL, and backslash, tab,
newline and carriage return escaped with a backslash. PostgreSQL stores no NUL character in text or
jsonb, so one is replaced by U+FFFD rather than failing the whole batch.
"""

from __future__ import annotations

import functools
import re
import time

import msgspec

from pipeline.models import Outcome

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
)

NULL = b"\\N"
_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r", "\x00": "\ufffd"})
_JSON_NUL = re.compile(rb"(?<!\\)((?:\\\\)*)\\u0000")
"""A ``\\u0000`` escape in JSON text, not preceded by an odd number of backslashes (an escaped one)."""
_json = msgspec.json.Encoder()


def copy_rows(outcomes: list[Outcome], *, store_bodies: bool) -> bytes:
    """The rows of ``outcomes`` for ``COPY messages (COLUMNS) FROM STDIN``."""
    return b"".join([_row(o, store_bodies) for o in outcomes])


def _row(o: Outcome, store_bodies: bool) -> bytes:
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
                NULL if o.prompt_tokens is None else b"%d" % o.prompt_tokens,
                NULL if o.completion_tokens is None else b"%d" % o.completion_tokens,
                _timestamp(m.enqueued_at),
                _timestamp(started),
                _timestamp(o.finished_at),
                NULL if started is None else repr((started - m.enqueued_at) * 1000).encode(),
                NULL if started is None else repr((o.finished_at - started) * 1000).encode(),
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


def _json_text(value: object) -> bytes:
    if value is None:
        return NULL
    data = _json.encode(value)  # control characters come out escaped: only backslashes need doubling
    if b"\\u0000" in data:
        data = _JSON_NUL.sub(rb"\1\\ufffd", data)
    return data.replace(b"\\", b"\\\\")


def _timestamp(seconds: float | None) -> bytes:
    if seconds is None:
        return NULL
    whole, micros = divmod(round(seconds * 1_000_000), 1_000_000)
    return b"%s.%06d+00" % (_second(whole), micros)


@functools.lru_cache(maxsize=4096)
def _second(whole: int) -> bytes:
    """The outcomes of a batch share a few seconds: each is formatted once."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(whole)).encode()
