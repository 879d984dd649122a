"""Crash safety with real processes: a dispatcher SIGKILLed in the middle of a backend call."""

from __future__ import annotations

import time

import httpx
import psycopg
import pytest
import redis.asyncio as aioredis

from llmq.pipeline.config import load_config
from llmq.pipeline.keys import Keys
from llmq.pipeline.models import encode
from llmq.pipeline.submit import Submission, Submitter, new_message
from tests.conftest import eventually, free_port
from tests.support.harness import CHAT
from tests.support.procs import Proc, llmq_stage, stop_all


@pytest.mark.timeout(120)
async def test_a_dispatcher_killed_mid_call_is_redelivered_and_archived_once(
    redis: aioredis.Redis, keys: Keys, stage_env: dict[str, str], database_url: str
) -> None:
    # Given the pipeline as processes, with a backend that takes 1.5 s per call
    mock_port = free_port()
    env = {
        **stage_env,
        "LLMQ_DATABASE_URL": database_url,
        "LLMQ_BACKENDS": f'[{{name: slow, url: "http://127.0.0.1:{mock_port}/v1", max_concurrent: 4}}]',
    }
    procs: list[Proc] = [llmq_stage(env, "run", "mock-backend", "--port", str(mock_port), "--latency-ms", "1500")]
    procs += [llmq_stage(env, "run", stage, "--port", "0") for stage in ("schedule", "archive")]
    first = llmq_stage(env, "run", "dispatch", "--port", "0")
    procs.append(first)
    try:
        procs[0].wait_for_log("mock backend listening")
        for p in procs[1:]:
            p.wait_for_log("stage started")
        config = load_config(None, env={"LLMQ_KEY_PREFIX": keys.prefix})
        msg = new_message(message_id="01a20000-0000-7000-8000-00000000c0de", level="high", request=CHAT)
        submitter = Submitter(config, redis=redis, keys=keys)
        await submitter.submit(Submission(msg, encode(msg)))
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{mock_port}") as mock:

            async def calling() -> bool:
                return (await mock.get("/stats")).json()["current"] == 1

            # When the dispatcher is SIGKILLed while its call runs
            await eventually(calling, what="the backend call to start")
            first.kill()
            killed_at = time.monotonic()
            second = llmq_stage(env, "run", "dispatch", "--port", "0")
            procs.append(second)

            # Then another dispatcher reclaims the entry and completes the message
            async def completed() -> bool:
                return await redis.hget(keys.msg(msg.id), "status") == b"completed"

            await eventually(completed, within=30, what="the message to complete")
            recovery_s = time.monotonic() - killed_at
            stats = (await mock.get("/stats")).json()

        # and the archive holds it exactly once
        async def archived() -> bool:
            async with await psycopg.AsyncConnection.connect(database_url) as conn:
                try:
                    cur = await conn.execute("SELECT count(*), max(status) FROM messages WHERE id = %s", (msg.id,))
                except psycopg.errors.UndefinedTable:
                    return False
                return await cur.fetchone() == (1, "completed")

        await eventually(archived, within=20, what="one archived row")
    finally:
        stop_all(procs, timeout=20)
    # The killed call is the only duplicate the backend saw
    assert stats["calls"] == 2 and stats["duplicates"] == 1
    assert recovery_s < 15
