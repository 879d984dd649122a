"""Running the stage runtime in a test: settings, entries to read, what was handled."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import redis.asyncio as aioredis

from llmq.pipeline.keys import Keys
from llmq.pipeline.models import FIELD
from llmq.pipeline.runtime.runner import Runner, RunnerSettings
from tests.support.worker import RecordingStage


def settings(**overrides: Any) -> RunnerSettings:
    base: dict[str, Any] = {
        "batch_size": 10,
        "block_ms": 100,
        "max_in_hand": 10,
        "claim_timeout_s": 1.0,
        "max_deliveries": 3,
        "grace_s": 10.0,
    }
    base.update(overrides)
    return RunnerSettings(**base)


async def add_jobs(redis: aioredis.Redis, stream: str, jobs: list[dict[str, Any]]) -> None:
    pipe = redis.pipeline(transaction=False)
    for job in jobs:
        pipe.xadd(stream, {FIELD: msgspec.msgpack.encode(job)})
    await pipe.execute()


async def ids(redis: aioredis.Redis, key: str) -> list[str]:
    return [v.decode().split(":")[0] for v in await redis.lrange(key, 0, -1)]


async def pending_count(redis: aioredis.Redis, stream: str, group: str = "work") -> int:
    info: Any = await redis.xpending(stream, group)
    return int(info["pending"])


@contextlib.asynccontextmanager
async def running(runner: Runner) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(runner.run())
    try:
        yield task
    finally:
        runner.stop()
        await asyncio.wait_for(task, timeout=15)


def make_runner(redis: aioredis.Redis, keys: Keys, stream: str, consumer: str, **kw: Any) -> Runner:
    stage = RecordingStage(redis=redis, stream=stream, group="work")
    return Runner(stage, redis=redis, keys=keys, consumer=consumer, settings=settings(**kw))
