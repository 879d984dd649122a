"""A batch survives its processes being killed: the batch stage SIGKILLed again and again while it feeds and
finalizes, a dispatcher SIGKILLed mid-calls; every custom_id comes out exactly once."""

from __future__ import annotations

import json

import httpx
import openai
import psycopg
import pytest
import redis.asyncio as aioredis

from llmq.pipeline.config import load_config
from llmq.pipeline.db import make_pool, migrate
from llmq.pipeline.keys import Keys
from llmq.pipeline.runtime.ops_server import OpsServer
from llmq.stages.ingest import create_app
from tests.conftest import eventually, free_port
from tests.support.procs import Proc, llmq_stage, stop_all
from tests.test_batches import ENDED, requests

LINES = 600


@pytest.mark.timeout(180)
async def test_every_custom_id_once_though_the_batch_and_dispatch_processes_are_killed(
    redis: aioredis.Redis, keys: Keys, stage_env: dict[str, str], database_url: str
) -> None:
    # Given the pipeline as processes, a backend of 20 ms a call, and a batch of 600 fed 50 at a time
    await migrate(database_url)
    mock_port = free_port()
    env = {
        **stage_env,
        "LLMQ_DATABASE_URL": database_url,
        "LLMQ_BATCHES__FEED_DEPTH": "50",
        "LLMQ_BACKENDS": f'[{{name: a, url: "http://127.0.0.1:{mock_port}/v1", max_concurrent: 8}}]',
    }
    procs: list[Proc] = [llmq_stage(env, "run", "mock-backend", "--port", str(mock_port), "--latency-ms", "20")]
    procs += [llmq_stage(env, "run", stage, "--port", "0") for stage in ("schedule", "retry", "archive")]
    dispatch = llmq_stage(env, "run", "dispatch", "--port", "0")
    batch = llmq_stage(env, "run", "batch", "--port", "0")
    procs += [dispatch, batch]
    config = load_config(None, env={k: v for k, v in env.items() if k.startswith("LLMQ_")})
    pool = make_pool(config.database.postgres)  # type: ignore[arg-type]
    server = OpsServer(create_app(config, redis=redis, keys=keys, pool=pool), host="127.0.0.1", port=0, lifespan=True)
    server.start()
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="-", max_retries=0)
    try:
        procs[0].wait_for_log("mock backend listening")
        for p in procs[1:]:
            p.wait_for_log("stage started")
        uploaded = await client.files.create(file=("in.jsonl", requests(LINES)), purpose="batch")
        created = await client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )

        async def fed_at_least(n: int) -> bool:
            return (await client.batches.retrieve(created.id)).request_counts.completed >= n  # type: ignore[union-attr]

        # When the batch stage is SIGKILLed five times while it feeds, and the dispatcher once mid-calls
        for kills in range(5):
            await eventually(lambda k=kills: fed_at_least(60 * (k + 1)), within=60, what="the batch moving on")
            batch.kill()
            batch = llmq_stage(env, "run", "batch", "--port", "0")
            procs.append(batch)
            if kills == 2:
                dispatch.kill()
                dispatch = llmq_stage(env, "run", "dispatch", "--port", "0")
                procs.append(dispatch)
            batch.wait_for_log("stage started")

        # and once more while it finalizes (its output is written again, never twice)
        async def finalizing() -> bool:
            return (await client.batches.retrieve(created.id)).status in ("finalizing", *ENDED)

        await eventually(finalizing, within=90, interval=0.01, what="the batch finalizing")
        batch.kill()
        batch = llmq_stage(env, "run", "batch", "--port", "0")
        procs.append(batch)

        async def ended() -> bool:
            return (await client.batches.retrieve(created.id)).status in ENDED

        await eventually(ended, within=60, what="the batch ended")
        done = await client.batches.retrieve(created.id)
        content = (await client.files.content(done.output_file_id)).content if done.output_file_id else b""
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{mock_port}") as mock:
            stats = (await mock.get("/stats")).json()
        async with await psycopg.AsyncConnection.connect(database_url) as conn:
            rows = await (await conn.execute(
                "SELECT count(*), count(DISTINCT custom_id) FROM messages WHERE batch_id = %s", (created.id,)
            )).fetchone()  # fmt: skip
            files = await (await conn.execute("SELECT count(*) FROM files WHERE tenant IS NULL")).fetchone()
    finally:
        await server.stop()
        await pool.close()
        stop_all(procs, timeout=20)
    # Then the batch completed, every custom_id exactly once in its output, one archived message per line
    assert done.status == "completed", done
    assert done.request_counts is not None and done.request_counts.completed == LINES
    ids = [json.loads(line)["custom_id"] for line in content.splitlines()]
    assert sorted(ids) == sorted(f"req-{i}" for i in range(LINES))
    assert rows == (LINES, LINES)
    # and the backend was called again only for the calls the killed dispatcher had running (at most 8)
    assert stats["duplicates"] <= 8, stats
    # and the files are the input and the one output, however often finalizing began
    assert files == (2,)
