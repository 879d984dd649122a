"""The dead-letter stream: list, show, replay and purge what the pipeline gave up on.

Two kinds of entries land there: messages that failed ``max_retries`` times (from retry) and poison
entries any stage delivered too often (from the runtime's reclaimer). Replay puts a message back in its
level stream with attempts reset — or an outcome back in ``done`` — and deletes the dead letter in the
same script, so replaying twice never makes two live copies.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import msgspec
import redis.asyncio as aioredis

from pipeline.keys import Keys
from pipeline.lua import Lua
from pipeline.models import FIELD, Message, Status, decode_message, decode_outcome, encode
from pipeline.streams import as_str

# KEYS: dlq, target stream, status hash (may be unused). ARGV: dlq entry id, payload, status or "".
_REPLAY = """
if #redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1]) == 0 then return 0 end
redis.call('XDEL', KEYS[1], ARGV[1])
redis.call('XADD', KEYS[2], '*', 'm', ARGV[2])
if ARGV[3] ~= '' then
  redis.call('PERSIST', KEYS[3])
  redis.call('HSET', KEYS[3], 'status', ARGV[3], 'attempts', 0, 'replayed_at', ARGV[4])
  redis.call('HDEL', KEYS[3], 'error', 'result', 'finished_at')
end
return 1
"""


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
    payload = fields.get(FIELD, b"")
    message: Message | None
    try:
        message = decode_message(payload)
    except msgspec.DecodeError:
        try:
            message = decode_outcome(payload).message
        except msgspec.DecodeError:
            message = None
    errors = msgspec.json.decode(fields[b"errors"]) if b"errors" in fields else []
    eid = as_str(entry_id)
    return DeadLetter(
        entry_id=eid,
        at=float(fields.get(b"at", b"0") or 0) or int(eid.split("-")[0]) / 1000,
        reason=as_str(fields.get(b"reason", b"")),
        source=as_str(fields.get(b"stream", b"")),
        message=message,
        payload=payload,
        error=as_str(fields[b"error"]) if b"error" in fields else None,
        errors=list(errors),
    )


class DeadLetters:
    def __init__(self, *, redis: aioredis.Redis, keys: Keys, levels: list[str]) -> None:
        self.redis = redis
        self.keys = keys
        self.levels = levels
        self._replay = Lua(redis, _REPLAY)

    async def list(self, *, limit: int = 50, since: float | None = None) -> list[DeadLetter]:
        start = f"{int(since * 1000)}-0" if since else "-"
        rows: Any = await self.redis.xrange(self.keys.dlq, min=start, count=limit)
        return [_parse(eid, f) for eid, f in rows]

    async def count(self) -> int:
        return int(await self.redis.xlen(self.keys.dlq))

    async def find(self, ident: str) -> DeadLetter | None:
        """By dead-letter entry id, or by message id (the newest dead letter of that message)."""
        if ident.replace("-", "").isdigit() and ident.count("-") == 1:
            rows: Any = await self.redis.xrange(self.keys.dlq, min=ident, max=ident)
            return _parse(*rows[0]) if rows else None
        found = None
        async for batch in self._all():
            for dl in batch:
                if dl.message_id == ident:
                    found = dl
        return found

    async def _all(self) -> Any:
        start = "-"
        while True:
            rows: Any = await self.redis.xrange(self.keys.dlq, min=start, count=500)
            if not rows:
                return
            yield [_parse(eid, f) for eid, f in rows]
            start = "(" + as_str(rows[-1][0])

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
            keys = [self.keys.dlq, self.keys.level(target_level), self.keys.msg(msg.id)]
            args: list[str | bytes | float] = [dl.entry_id, encode(replayed), Status.QUEUED.value, now]
        else:
            # an outcome the archive could not take: back to done as it was
            keys = [self.keys.dlq, self.keys.done, self.keys.dlq]
            args = [dl.entry_id, dl.payload, "", now]
        return bool(await self._replay(keys, args))

    async def purge(self, *, older_than_s: float) -> int:
        cutoff = int((time.time() - older_than_s) * 1000)
        return int(await self.redis.xtrim(self.keys.dlq, minid=f"{cutoff}-0", approximate=False))
