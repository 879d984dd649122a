"""Putting messages into their level stream: backpressure, idempotency, XADD and the status hash at once.

A Lua script decides and writes each message atomically (a batch, up to ``PER_CALL`` messages per call),
so concurrent duplicates of one idempotency key create one message, and a full level writes nothing. A
level's depth is lag + pending of the ``schedule`` group (what waits for admission), not XLEN, which also
counts acked entries not yet trimmed.
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

# Submits n messages, each decided on its own, in one call. KEYS: per message its level stream, status
# hash and idempotency key ("" key name when none). ARGV: hash TTL s, idempotency TTL s, then per message
# its payload, id, level, enqueued_at, max depth and has-idempotency-key ("1"/"0"). Returns per message
# {"queued", id, depth} | {"duplicate", existing id} | {"full", depth}. A level's depth is read once per
# call (XINFO GROUPS) and counted up as the call queues messages in it.
_SUBMIT = """
local function waiting(stream)
  local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', stream)
  if ok then
    for _, g in ipairs(groups) do
      local f = {}
      for i = 1, #g, 2 do f[g[i]] = g[i + 1] end
      if f['name'] == 'schedule' and f['lag'] then return tonumber(f['pending']) + tonumber(f['lag']) end
    end
  end
  return redis.call('XLEN', stream)
end
local depths, out = {}, {}
for i = 1, #KEYS / 3 do
  local stream, hash, idem = KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i]
  local a = 2 + 6 * (i - 1)
  local id, has_idem = ARGV[a + 2], ARGV[a + 6] == '1'
  local existing = has_idem and redis.call('GET', idem)
  if existing then
    out[i] = {'duplicate', existing}
  else
    local depth = depths[stream] or waiting(stream)
    if depth >= tonumber(ARGV[a + 5]) then
      out[i] = {'full', depth}
    else
      if has_idem then redis.call('SET', idem, id, 'EX', ARGV[2]) end
      redis.call('XADD', stream, '*', 'm', ARGV[a + 1])
      redis.call('HSET', hash, 'status', 'queued', 'level', ARGV[a + 3], 'attempts', 0, 'enqueued_at', ARGV[a + 4])
      redis.call('EXPIRE', hash, ARGV[1])
      out[i] = {'queued', id, depth}
      depth = depth + 1
    end
    depths[stream] = depth
  end
end
return out
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
PER_CALL = 100
"""Messages of a batch per submit script call. One call per message made Valkey run the script's set-up
and read the level's depth (XINFO GROUPS) for each; a call holds Valkey for about 0.4 ms per 100."""


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
        keys, args = self._call([(msg, payload or encode(msg))])
        return _verdict((await self._one(keys, args))[0])

    async def submit_many(self, messages: list[tuple[Message, bytes]]) -> list[Submitted]:
        """Each (message, its encoding) decided on its own, ``PER_CALL`` of them per script call (each call
        atomic), all in one round trip."""
        calls = [self._call(messages[i : i + PER_CALL]) for i in range(0, len(messages), PER_CALL)]
        verdicts: list[Submitted] = []
        for reply in await self._script.many(calls) if calls else []:
            if isinstance(reply, Exception):
                raise reply
            verdicts += [_verdict(r) for r in reply]
        return verdicts

    def _call(self, messages: list[tuple[Message, bytes]]) -> tuple[list[str], list[str | bytes | int | float]]:
        keys: list[str] = []
        args: list[str | bytes | int | float] = [HASH_TTL_S, IDEMPOTENCY_TTL_S]
        for msg, payload in messages:
            idem = msg.idempotency_key
            keys += [self.keys.level(msg.level), self.keys.msg(msg.id), self.keys.idem(idem or "")]
            # callers validate the level
            args += [payload, msg.id, msg.level, msg.enqueued_at, self._max_size[msg.level], "1" if idem else "0"]
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
