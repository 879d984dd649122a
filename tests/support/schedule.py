"""Messages as a scheduler holds them, for tests of the arbiter."""

from __future__ import annotations

import redis.asyncio as aioredis

from llmq.pipeline.keys import Keys
from llmq.pipeline.models import FIELD, encode, new_id
from llmq.pipeline.runtime.streams import ensure_group, parse_entries
from llmq.pipeline.submit import new_message
from llmq.stages.schedule.arbiter import Candidate, Decisions
from tests.support.harness import CHAT


async def pending(redis: aioredis.Redis, keys: Keys, consumer: str, n: int, decisions: Decisions) -> list[Candidate]:
    """``n`` normal messages as a scheduler holds them: entries of the level stream pending for ``consumer``."""
    stream = keys.level("normal")
    await ensure_group(redis, stream, "schedule")
    messages = [new_message(message_id=new_id(), level="normal", request=CHAT) for _ in range(n)]
    for m in messages:
        await redis.xadd(stream, {FIELD: encode(m)})
        await redis.hset(keys.msg(m.id), "status", "queued")
    reply = await redis.xreadgroup("schedule", consumer, {stream: ">"}, count=n)
    return [Candidate(e, m, decisions) for e, m in zip(parse_entries(reply[0][1]), messages, strict=True)]
