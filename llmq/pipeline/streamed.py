"""Streamed messages (``stream: true`` in the request): the per-message events stream both sides share.

The dispatcher appends each chunk the backend sends, as it comes (field ``c``: the chunk's JSON as the
backend sent it; ``u`` for a chunk that holds only ``usage``); the commit that ends the message appends
the end (field ``end``: the status, and the error when it failed) and gives the stream the status hash's
retention TTL. Any ingest process follows the stream and relays it as server-sent events, each with the
entry id as its ``id:``, so a client that reconnects with ``Last-Event-ID`` resumes where it was, through
any replica.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from llmq.pipeline.models import Message, Outcome

CHUNK = b"c"
USAGE = b"u"
"""A chunk with only ``usage`` (asked of every backend, to count tokens): relayed to clients that asked."""
END = b"end"
MAX_EVENTS = 100_000
"""A stream's bound (approximate MAXLEN): far more chunks than any completion has."""
LIVE_TTL_S = 7 * 24 * 3600
"""The events stream's TTL until its message ends (then the status hash's retention)."""
_ENTRY_ID = re.compile(r"[0-9]{1,20}-[0-9]{1,20}", re.ASCII)
_json = msgspec.json.Encoder()


def is_streamed(msg: Message) -> bool:
    return msg.request.get("stream") is True


def end_event(outcome: Outcome) -> bytes:
    doc: dict[str, Any] = {"status": outcome.status.value}
    if outcome.error:
        doc["error"] = outcome.error
    return _json.encode(doc)


def valid_event_id(value: str) -> bool:
    """A stream entry id (``<ms>-<seq>``, each part at most 2**64 - 1), as ``Last-Event-ID`` and ``?after=``
    must be: Redis refuses any other, and one refused id would fail the read of every stream followed."""
    if _ENTRY_ID.fullmatch(value) is None:
        return False
    ms, _, seq = value.partition("-")
    return int(ms) < 2**64 and int(seq) < 2**64
