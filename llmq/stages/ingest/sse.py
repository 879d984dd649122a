"""A message's life as server-sent events: the items a client is sent, read from its events stream (a
streamed message's chunks and end, ``llmq.pipeline.streamed``) and its status hash (status changes, and the
end of a message that was not streamed); formatted for the native API or for OpenAI's SDKs.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import redis.asyncio as aioredis
from prometheus_client import Gauge

from llmq.pipeline.keys import Keys
from llmq.pipeline.models import Status
from llmq.pipeline.streamed import CHUNK, END, USAGE
from llmq.stages.ingest.drain import DrainMeter
from llmq.stages.ingest.events import EventHub

OPEN_STREAMS = Gauge("llmq_open_streams", "Server-sent event streams open to clients in this process")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
"""No cache, and no buffering in nginx: each event goes out as it comes."""
TICK_S = 1.0
"""How often the status is read while no event comes (a comment keeps proxies from closing the stream)."""
_json = msgspec.json.Encoder()
STATUS_FIELDS = ["status", "backend", "error", "level", "behind", "left_mark"]


@dataclass(slots=True)
class Item:
    kind: str
    """``chunk``, ``usage`` (a chunk holding only usage), ``status`` or ``end``."""
    data: bytes
    event_id: str | None = None


async def life(
    redis: aioredis.Redis,
    keys: Keys,
    hub: EventHub,
    message_id: str,
    *,
    streamed: bool,
    after: str,
    wait_end: Callable[[float], Awaitable[bool]],
    drain: DrainMeter,
    idle_s: float | None = None,
) -> AsyncIterator[Item]:
    """Every item of the message's life after ``after`` until its end: status changes (when one is read;
    while queued, its position and estimated wait as they change), each chunk, then the end.
    ``wait_end(seconds)`` waits for the message to end (a non-streamed one). With ``idle_s``, it stops early
    after that long without an item (the client reconnects to go on)."""
    follower = hub.follow(keys.events(message_id), after) if streamed else None
    shown: tuple[Any, ...] | None = None
    ended_seen = 0
    quiet_since = time.monotonic()
    try:
        while True:
            if idle_s is not None and time.monotonic() - quiet_since > idle_s:
                return
            event = await follower.next(min(TICK_S, idle_s or TICK_S)) if follower is not None else None
            if event is None and follower is not None and follower.overrun:
                return  # read too slowly: the client resumes from its last id
            if event is not None:
                quiet_since = time.monotonic()
                entry_id, fields = event
                if CHUNK in fields:
                    yield Item("chunk", fields[CHUNK], entry_id)
                elif USAGE in fields:
                    yield Item("usage", fields[USAGE], entry_id)
                elif END in fields:
                    yield Item("end", fields[END], entry_id)
                    return
                continue
            if follower is None:
                await wait_end(min(TICK_S, idle_s or TICK_S))
            read: Any = await redis.hmget(keys.msg(message_id), STATUS_FIELDS)
            status, backend, error, level, behind, left_mark = read
            if status is None:
                yield Item("end", _json.encode({"status": "unknown", "error": "the message is gone"}))
                return
            doc = {"status": status.decode()} | ({"backend": backend.decode()} if backend else {})
            if status == b"queued" and level and behind is not None and left_mark is not None:
                ahead, wait_s = drain.position(level.decode(), int(behind), int(left_mark))
                doc |= {"position": ahead} | ({"eta_s": wait_s} if wait_s is not None else {})
            now = tuple(doc.values())
            if now != shown:
                shown = now
                quiet_since = time.monotonic()
                yield Item("status", _json.encode(doc))
            if Status(status.decode()).terminal:
                # A streamed message's end follows in its stream; one ended by a cancel has none.
                ended_seen += 1
                if follower is None or ended_seen > 1:
                    doc = {"status": status.decode()} | ({"error": error.decode()} if error else {})
                    yield Item("end", _json.encode(doc))
                    return
    finally:
        if follower is not None:
            hub.leave(follower)


def native(item: Item) -> bytes:
    """As ``GET /api/v1/messages/{id}/events`` sends it: ``event:`` names the kind."""
    head = f"id: {item.event_id}\n" if item.event_id else ""
    kind = "chunk" if item.kind == "usage" else item.kind
    return f"{head}event: {kind}\ndata: ".encode() + item.data + b"\n\n"


def comment(text: str) -> bytes:
    """A comment line: SDKs ignore it; curl shows it; proxies see traffic."""
    return b": " + text.replace("\n", " ").encode() + b"\n\n"


def openai_chunk(item: Item) -> bytes:
    head = f"id: {item.event_id}\n".encode() if item.event_id else b""
    return head + b"data: " + item.data + b"\n\n"


def openai_error(message: str, kind: str = "api_error") -> bytes:
    """An error in the stream as OpenAI sends one: the SDKs raise it."""
    return (
        b"data: " + _json.encode({"error": {"message": message, "type": kind, "param": None, "code": None}}) + b"\n\n"
    )


DONE = b"data: [DONE]\n\n"
RETRY = b"retry: 1000\n\n"
"""Tells an EventSource to reconnect a second after the stream ends early."""
