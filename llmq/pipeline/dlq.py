"""The dead-letter stream: write, list, show, replay, purge and bound what the pipeline gave up on.

Entries land there from three places: messages that failed ``max_retries`` times (retry), poison entries
any stage delivered too often (the runtime's reclaimer), and outcomes PostgreSQL rejected (archive). Each
is written by ``dead_letter``, as an effect of the commit that acks its entry, and indexed by message id
(``keys.dlq_index``), so finding one by message id reads one hash field instead of scanning the stream.
Replay puts a message back in its level stream with attempts reset — or an outcome back in ``done`` — and
deletes the dead letter in the same script, so replaying twice never makes two live copies. ``trim``
keeps the stream within its configured length and age.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from llmq.pipeline import webhooks
from llmq.pipeline.config import Config
from llmq.pipeline.keys import Keys
from llmq.pipeline.lua import Lua
from llmq.pipeline.models import FIELD, Message, Status, decode_message, decode_outcome, encode
from llmq.pipeline.runtime import effects
from llmq.pipeline.runtime.streams import as_str
from llmq.pipeline.streamed import is_streamed
from llmq.pipeline.transitions import UNENDED_TTL_S

TRIM_PER_CALL = 1000
"""Dead letters dropped per script call when trimming, so one call never holds Redis long."""
INDEXED = ""
"""The index's field saying that dead letters written before it existed have been indexed (``reindex``); no
message id is empty."""
_ENTRY_ID = re.compile(r"[0-9]{1,20}-[0-9]{1,20}", re.ASCII)


class NotReplayable(ValueError):
    """A dead letter that holds nothing to put back (what it holds cannot be read)."""


def dead_letter(
    keys: Keys,
    *,
    payload: bytes,
    message_id: str | None,
    reason: str,
    source: str,
    fields: dict[bytes, Any] | None = None,
) -> effects.Effect:
    """The effect that writes one dead letter: the entry's payload, why, where it came from, when, and any
    further ``fields``; indexed by ``message_id`` when it has one."""
    row: dict[bytes, Any] = {FIELD: payload, b"reason": reason, b"stream": source, b"at": f"{time.time():.3f}"}
    if message_id:
        row[b"message_id"] = message_id
    return effects.deadletter(keys.dlq, keys.dlq_index, message_id, row | (fields or {}))


@dataclass(slots=True)
class DeadLetter:
    entry_id: str
    at: float
    reason: str
    source: str
    """The stream the entry came from."""
    message: Message | None
    payload: bytes
    error: str | None = None
    errors: list[str] = field(default_factory=list)

    @property
    def message_id(self) -> str | None:
        return self.message.id if self.message else None

    def summary(self) -> dict[str, Any]:
        return {
            "entry_id": self.entry_id,
            "message_id": self.message_id,
            "level": self.message.level if self.message else None,
            "at": self.at,
            "reason": self.reason,
            "error": self.error,
            "errors": self.errors,
            "source": self.source,
        }


def _parse(entry_id: Any, fields: dict[bytes, bytes]) -> DeadLetter:
    """A dead letter as written by ``dead_letter`` or by an earlier release; whatever its fields hold (text
    that is not UTF-8, errors that are not a JSON list, a time that is not a number), it is readable."""
    payload = fields.get(FIELD, b"")
    message: Message | None
    try:
        message = decode_message(payload)
    except msgspec.DecodeError:
        try:
            message = decode_outcome(payload).message
        except msgspec.DecodeError:
            message = None
    try:
        errors = msgspec.json.decode(fields.get(b"errors", b"[]"))
    except msgspec.DecodeError:
        errors = [_text(fields[b"errors"])]
    eid = as_str(entry_id)
    try:
        at = float(fields.get(b"at", b"0") or 0)
    except ValueError:
        at = 0.0
    return DeadLetter(
        entry_id=eid,
        at=at or int(eid.split("-")[0]) / 1000,
        reason=_text(fields.get(b"reason", b"")),
        source=_text(fields.get(b"stream", b"")),
        message=message,
        payload=payload,
        error=_text(fields[b"error"]) if b"error" in fields else None,
        errors=[_text(e) if isinstance(e, bytes) else str(e) for e in errors] if isinstance(errors, list) else [],
    )


def _text(value: bytes) -> str:
    return value.decode(errors="replace")


class DeadLetters:
    def __init__(self, *, redis: aioredis.Redis, keys: Keys, config: Config) -> None:
        self.redis = redis
        self.keys = keys
        self.config = config
        self.levels = [lv.name for lv in config.queue.levels]
        self._replay = Lua(redis, "dlq_replay")
        self._trim = Lua(redis, "dlq_trim")
        self._index = Lua(redis, "dlq_index")

    async def list(self, *, limit: int = 50, since: float | None = None) -> list[DeadLetter]:
        start = f"{int(since * 1000)}-0" if since and since > 0 else "-"
        rows: Any = await self.redis.xrange(self.keys.dlq, min=start, count=limit)
        return [_parse(eid, f) for eid, f in rows]

    async def count(self) -> int:
        return int(await self.redis.xlen(self.keys.dlq))

    async def find(self, ident: str) -> DeadLetter | None:
        """By dead-letter entry id, or by message id (its newest dead letter), without a scan."""
        if not _ENTRY_ID.fullmatch(ident):
            entry_id: Any = await self.redis.hget(self.keys.dlq_index, ident)
            if entry_id is None:
                return None
            ident = as_str(entry_id)
        try:
            rows: Any = await self.redis.xrange(self.keys.dlq, min=ident, max=ident)
        except ResponseError:  # an id past what a stream id holds (64 bits each side)
            return None
        return _parse(*rows[0]) if rows else None

    async def reindex(self) -> int:
        """Index the dead letters written before the index existed (by an earlier release), once: the index
        remembers it has been done. A message's newest dead letter wins (``scripts/dlq_index.lua``). Returns
        how many index entries it wrote."""
        if await self.redis.hexists(self.keys.dlq_index, INDEXED):
            return 0
        indexed, start = 0, "-"
        while True:
            rows: Any = await self.redis.xrange(self.keys.dlq, min=start, count=TRIM_PER_CALL)
            if not rows:
                break
            pairs: list[str] = []
            for eid, fields in rows:
                dl = _parse(eid, fields)
                if dl.message_id:
                    pairs += [dl.message_id, dl.entry_id]
            if pairs:
                indexed += int(await self._index([self.keys.dlq_index], pairs))
            start = "(" + as_str(rows[-1][0])
        await self.redis.hset(self.keys.dlq_index, INDEXED, "1")
        return indexed

    async def replay(self, dl: DeadLetter, *, level: str | None = None) -> bool:
        """Back into the pipeline; False when it was already replayed (or purged)."""
        now = time.time()
        if dl.message is not None and (dl.source != self.keys.done or level):
            msg = dl.message
            target_level = level or msg.level
            if target_level not in self.levels:
                raise ValueError(f"unknown level {target_level!r}; levels: {', '.join(self.levels)}")
            note = f"{now:.3f} replayed from dead letter {dl.entry_id} after {msg.attempts} attempts"
            replayed = msgspec.structs.replace(
                msg, level=target_level, attempts=0, retry_after=None, history=[*msg.history, note]
            )
            keys = [self.keys.dlq, self.keys.level(target_level), self.keys.msg(msg.id), self.keys.dlq_index]
            keys += [self.keys.events(msg.id), self.keys.tenant_open(msg.tenant)]
            streamed = "1" if is_streamed(msg) else ""
            # open again: it counts toward its tenant's max_queued until it ends
            counted = now + UNENDED_TTL_S if self.config.tenant(msg.tenant).max_queued else ""
            args: list[str | bytes | float] = [dl.entry_id, encode(replayed), Status.QUEUED.value, now, msg.id]
            args += [streamed, counted]
        elif dl.source == self.keys.webhooks:
            # a webhook delivery that failed its attempts: delivered again, its attempts counted from 0
            try:
                payload = webhooks.encode(msgspec.structs.replace(webhooks.decode(dl.payload), attempts=0))
            except msgspec.DecodeError:
                raise NotReplayable(f"dead letter {dl.entry_id} holds no webhook delivery: purge it") from None
            keys = [self.keys.dlq, self.keys.webhooks, self.keys.dlq, self.keys.dlq_index, self.keys.dlq, self.keys.dlq]
            args = [dl.entry_id, payload, "", now, "", "", ""]
        else:
            # an outcome the archive could not take: back to done as it was
            keys = [self.keys.dlq, self.keys.done, self.keys.dlq, self.keys.dlq_index, self.keys.dlq, self.keys.dlq]
            args = [dl.entry_id, dl.payload, "", now, dl.message_id or "", "", ""]
        return bool(await self._replay(keys, args))

    async def purge(self, *, older_than_s: float) -> int:
        """Delete the dead letters older than ``older_than_s``; return how many."""
        return await self.trim(max_len=2**62, max_age_s=older_than_s)

    async def trim(self, *, max_len: int, max_age_s: float) -> int:
        """Drop the oldest dead letters beyond ``max_len`` or older than ``max_age_s``; return how many."""
        min_ms = int((time.time() - max_age_s) * 1000)
        dropped = 0
        while True:
            n = int(await self._trim([self.keys.dlq, self.keys.dlq_index], [min_ms, max_len, TRIM_PER_CALL]))
            dropped += n
            if n < TRIM_PER_CALL:
                return dropped
