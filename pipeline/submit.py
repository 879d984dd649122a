"""Putting messages into their level stream: backpressure, idempotency, XADD and the status hash at once.

One Lua script per submission decides and writes atomically, so concurrent duplicates of one idempotency
key create one message, and a full level writes nothing. A level's depth is lag + pending of the
``schedule`` group (what waits for admission), not XLEN, which also counts acked entries not yet trimmed.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass

import redis.asyncio as aioredis

from pipeline.config import Config
from pipeline.keys import Keys
from pipeline.lua import Coalesced, Lua
from pipeline.models import Message, encode
from pipeline.streams import as_str

# KEYS: level stream, status hash, idempotency key ("" key name when none). ARGV: payload, message id,
# level, now, max depth, hash TTL s, idempotency TTL s, has-idempotency-key ("1"/"0").
# Returns {"queued", id, depth} | {"duplicate", existing id} | {"full", depth}.
_SUBMIT = """
if ARGV[8] == '1' then
  local existing = redis.call('GET', KEYS[3])
  if existing then return {'duplicate', existing} end
end
local depth = nil
local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', KEYS[1])
if ok then
  for _, g in ipairs(groups) do
    local f = {}
    for i = 1, #g, 2 do f[g[i]] = g[i + 1] end
    if f['name'] == 'schedule' and f['lag'] then
      depth = tonumber(f['pending']) + tonumber(f['lag'])
    end
  end
end
if depth == nil then depth = redis.call('XLEN', KEYS[1]) end
if depth >= tonumber(ARGV[5]) then return {'full', depth} end
if ARGV[8] == '1' then redis.call('SET', KEYS[3], ARGV[2], 'EX', ARGV[7]) end
redis.call('XADD', KEYS[1], '*', 'm', ARGV[1])
redis.call('HSET', KEYS[2], 'status', 'queued', 'level', ARGV[3], 'attempts', 0, 'enqueued_at', ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[6])
return {'queued', ARGV[2], depth}
"""

# KEYS: status hash. ARGV: now, finished channel. Returns the status after the call (nil: no such message).
_CANCEL = """
local s = redis.call('HGET', KEYS[1], 'status')
if not s then return false end
if s == 'queued' or s == 'scheduled' or s == 'retrying' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'cancelled_at', ARGV[1])
  redis.call('PUBLISH', ARGV[2], string.match(KEYS[1], '[^:]+$'))
  return 'cancelled'
end
return s
"""

HASH_TTL_S = 7 * 24 * 3600
"""A queued message's status hash lives this long at most; finishing sets ``queue.result_retention``."""
IDEMPOTENCY_TTL_S = 24 * 3600


class Verdict(enum.Enum):
    QUEUED = "queued"
    DUPLICATE = "duplicate"
    FULL = "full"


@dataclass(frozen=True, slots=True)
class Submitted:
    verdict: Verdict
    message_id: str | None
    depth: int | None = None
    """Messages waiting in the level before this one (its position), or the depth that made it full."""


class Submitter:
    def __init__(self, config: Config, *, redis: aioredis.Redis, keys: Keys) -> None:
        self.config = config
        self.redis = redis
        self.keys = keys
        self._script = Lua(redis, _SUBMIT)
        self._one = Coalesced(self._script)
        self._cancel = Lua(redis, _CANCEL)
        self._max_size = {lv.name: config.queue.max_size(lv) for lv in config.queue.levels}

    async def cancel(self, message_id: str) -> str | None:
        """Cancel a message not yet dispatched (queued, scheduled or retrying); return its status after."""
        status = await self._cancel([self.keys.msg(message_id)], [time.time(), self.keys.finished])
        return as_str(status) if status else None

    async def submit(self, msg: Message, payload: bytes | None = None) -> Submitted:
        """One script call; the submissions of concurrent requests share a round trip."""
        keys, args = self._call(msg, payload or encode(msg))
        return _verdict(await self._one(keys, args))

    async def submit_many(self, messages: list[tuple[Message, bytes]]) -> list[Submitted]:
        """Each (message, its encoding) atomically, in its own script call; all in one round trip."""
        if not messages:
            return []
        replies = await self._script.many([self._call(msg, payload) for msg, payload in messages])
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return [_verdict(reply) for reply in replies]

    def _call(self, msg: Message, payload: bytes) -> tuple[list[str], list[str | bytes | int | float]]:
        idem = msg.idempotency_key
        keys = [self.keys.level(msg.level), self.keys.msg(msg.id), self.keys.idem(idem) if idem else self.keys.idem("")]
        args: list[str | bytes | int | float] = [
            payload,
            msg.id,
            msg.level,
            msg.enqueued_at,
            self._max_size[msg.level],  # callers validate the level
            HASH_TTL_S,
            IDEMPOTENCY_TTL_S,
            "1" if idem else "0",
        ]
        return keys, args


def _verdict(reply: list[bytes | int]) -> Submitted:
    verdict = Verdict(as_str(reply[0]))
    if verdict is Verdict.FULL:
        return Submitted(verdict, None, int(reply[1]))
    if verdict is Verdict.DUPLICATE:
        return Submitted(verdict, as_str(reply[1]))
    return Submitted(verdict, as_str(reply[1]), int(reply[2]))


def new_message(
    *,
    message_id: str,
    level: str,
    request: dict[str, object],
    session_id: str | None = None,
    tenant: str | None = None,
    idempotency_key: str | None = None,
    deadline_ms: int | None = None,
    metadata: dict[str, object] | None = None,
) -> Message:
    now = time.time()
    return Message(
        id=message_id,
        level=level,
        request=request,
        session_id=session_id,
        tenant=tenant,
        idempotency_key=idempotency_key,
        enqueued_at=now,
        deadline=None if deadline_ms is None else now + deadline_ms / 1000,
        metadata=dict(metadata or {}),
    )
