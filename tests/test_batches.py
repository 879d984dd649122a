"""OpenAI's Batch API on llmq (``/v1/batches``), run by the batch stage: the official SDK end to end, every
``custom_id`` exactly once in the output whatever happens (a cancel, the window's end), and a batch's lines
queued only as fast as its level drains."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import psycopg
import redis.asyncio as aioredis

from llmq.cli.stages import make_batch
from llmq.pipeline import batches
from llmq.pipeline.db import make_pool, migrate
from llmq.pipeline.keys import Keys
from llmq.pipeline.level_status import level_status
from llmq.pipeline.runtime.ops_server import OpsServer
from llmq.stages.ingest import create_app
from llmq.stages.mock_backend import MockSettings
from tests.conftest import eventually
from tests.support.harness import Harness

ENDED = ("completed", "failed", "expired", "cancelled")


@contextlib.asynccontextmanager
async def _api(h: Harness, redis: aioredis.Redis, keys: Keys) -> AsyncIterator[openai.AsyncOpenAI]:
    """The ingest API of ``h``'s config on a real port (as `llmq-stage run ingest`), with its PostgreSQL pool."""
    pool = make_pool(h.config.database.postgres)  # type: ignore[arg-type]
    server = OpsServer(create_app(h.config, redis=redis, keys=keys, pool=pool), host="127.0.0.1", port=0, lifespan=True)
    server.start()
    try:
        yield openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="-", max_retries=0)
    finally:
        await server.stop()


@contextlib.asynccontextmanager
async def pipeline(
    redis: aioredis.Redis,
    keys: Keys,
    database_url: str,
    backend: MockSettings,
    env: dict[str, str] | None = None,
    max_concurrent: int = 8,
) -> AsyncIterator[tuple[Harness, openai.AsyncOpenAI]]:
    """Every stage, the batch stage with them, and the ingest API on a real port with its PostgreSQL pool."""
    stages = ("schedule", "dispatch", "retry", "batch")
    config = {"a": {"max_concurrent": max_concurrent}}
    async with (
        Harness(
            redis, keys, backends={"a": backend}, env=env, database_url=database_url, stages=stages,
            backend_config=config,
        ) as h,
        _api(h, redis, keys) as client,
    ):  # fmt: skip
        yield h, client


def requests(n: int, url: str = "/v1/chat/completions") -> bytes:
    lines = []
    for i in range(n):
        body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": f"question {i}"}]}
        if url == "/v1/embeddings":
            body = {"model": "m", "input": f"text {i}"}
        lines.append(json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": url, "body": body}))
    return ("\n".join(lines) + "\n").encode()


async def ended(client: openai.AsyncOpenAI, batch_id: str, within: float = 60) -> Any:
    async def done() -> bool:
        return (await client.batches.retrieve(batch_id)).status in ENDED

    await eventually(done, within=within, interval=0.2, what=f"batch {batch_id} ended")
    return await client.batches.retrieve(batch_id)


async def lines_of(client: openai.AsyncOpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    content = (await client.files.content(file_id)).content
    return [json.loads(line) for line in content.splitlines()]


async def test_the_openai_sdk_runs_a_batch_end_to_end(redis: aioredis.Redis, keys: Keys, database_url: str) -> None:
    async with pipeline(redis, keys, database_url, MockSettings(latency_ms=5)) as (_, client):
        # Given an input file uploaded with the SDK
        uploaded = await client.files.create(file=("in.jsonl", requests(40)), purpose="batch")
        # When a batch is created of it, as OpenAI's guide does
        batch = await client.batches.create(
            input_file_id=uploaded.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata={"description": "nightly eval job"},
        )
        assert batch.status == "validating" and batch.request_counts and batch.request_counts.total == 40
        # Then it completes, every request answered once in the output, keyed by custom_id
        done = await ended(client, batch.id)
        assert done.status == "completed", done
        assert done.request_counts is not None and (done.request_counts.completed, done.request_counts.failed) == (
            40,
            0,
        )
        assert done.metadata == {"description": "nightly eval job"} and done.error_file_id is None
        assert done.in_progress_at and done.finalizing_at and done.completed_at
        out = await lines_of(client, done.output_file_id)
        assert sorted(line["custom_id"] for line in out) == sorted(f"req-{i}" for i in range(40))
        first = next(line for line in out if line["custom_id"] == "req-7")
        assert first["response"]["status_code"] == 200 and first["error"] is None
        assert first["response"]["body"]["object"] == "chat.completion"
        assert first["id"].startswith("batch_req_")

        # and its messages leave Redis a second after they are archived (not the minute others stay: a batch's
        # results are read from its output file, and 50,000 kept a minute would grow Redis with the batch)
        async def gone() -> bool:
            return not any([await redis.exists(keys.msg(batches.message_id(batch.id, i))) for i in range(40)])

        await eventually(gone, within=10, what="the batch's status hashes gone")
        # and it is listed; its input file cannot be deleted while it runs, and can once it ended
        assert [b.id for b in (await client.batches.list()).data] == [batch.id]
        assert (await client.files.delete(uploaded.id)).deleted
    # and the operator sees it from the command line
    listed = await _cli(database_url, "list")
    assert listed.returncode == 0 and batch.id in listed.stdout and "completed" in listed.stdout, listed.stderr
    shown = await _cli(database_url, "show", batch.id)
    assert json.loads(shown.stdout)["request_counts"] == {"total": 40, "completed": 40, "failed": 0}
    refused = await _cli(database_url, "cancel", batch.id)
    assert refused.returncode == 1 and "has ended (completed)" in refused.stderr
    unknown = await _cli(database_url, "show", "batch_nope")
    assert unknown.returncode == 1 and "no such batch" in unknown.stderr


async def _cli(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``llmq-stage batches <args>`` against the test's database."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMQ_")} | {"LLMQ_DATABASE_URL": database_url}
    argv = [sys.executable, "-m", "llmq.cli", "batches", *args]
    return await asyncio.to_thread(subprocess.run, argv, env=env, capture_output=True, text=True, timeout=60)


async def test_a_cancelled_batch_keeps_what_finished_and_names_every_other_line(
    redis: aioredis.Redis, keys: Keys, database_url: str
) -> None:
    # Given a batch of 200 on a slow backend (2 calls at once, 100 ms each)
    backend = MockSettings(latency_ms=100)
    async with pipeline(redis, keys, database_url, backend, max_concurrent=2) as (_, client):
        uploaded = await client.files.create(file=("in.jsonl", requests(200)), purpose="batch")
        batch = await client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )

        async def some_done() -> bool:
            counts = (await client.batches.retrieve(batch.id)).request_counts
            return counts is not None and counts.completed >= 4

        await eventually(some_done, within=30, what="a few lines completed")
        # When it is cancelled
        cancelling = await client.batches.cancel(batch.id)
        assert cancelling.status == "cancelling"
        done = await ended(client, batch.id)
        out, errors = await lines_of(client, done.output_file_id), await lines_of(client, done.error_file_id)
    # Then it ends cancelled, with what completed in the output and every other line in the error file, each
    # custom_id exactly once across the two
    assert done.status == "cancelled" and done.cancelled_at
    ids = [line["custom_id"] for line in out + errors]
    assert sorted(ids) == sorted(f"req-{i}" for i in range(200))
    assert done.request_counts is not None and done.request_counts.completed == len(out) >= 4
    assert {line["error"]["code"] for line in errors} <= {"cancelled", "batch_cancelled"}
    assert len(errors) > 100


async def test_a_batch_past_its_window_expires_keeping_what_finished(
    redis: aioredis.Redis, keys: Keys, database_url: str
) -> None:
    backend = MockSettings(latency_ms=100)
    async with pipeline(redis, keys, database_url, backend, max_concurrent=2) as (_, client):
        uploaded = await client.files.create(file=("in.jsonl", requests(300, "/v1/embeddings")), purpose="batch")
        # When a batch's window (3 s) ends before its 300 requests can run (about 20 a second)
        batch = await client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="3s"
        )
        done = await ended(client, batch.id, within=60)
        out, errors = await lines_of(client, done.output_file_id), await lines_of(client, done.error_file_id)
    # Then it is expired, what finished is in the output, and every other line is in the error file once
    assert done.status == "expired" and done.expired_at
    assert sorted(line["custom_id"] for line in out + errors) == sorted(f"req-{i}" for i in range(300))
    assert 10 <= len(out) < 300 and out[0]["response"]["body"]["object"] == "list"
    assert {line["error"]["code"] for line in errors} <= {"expired", "batch_expired"}


async def test_a_batch_is_fed_as_its_level_drains(redis: aioredis.Redis, keys: Keys, database_url: str) -> None:
    # Given a batch of 400 on a slow backend, with at most 30 of the level's messages waiting
    env = {"LLMQ_BATCHES__FEED_DEPTH": "30"}
    async with pipeline(redis, keys, database_url, MockSettings(latency_ms=20), env, max_concurrent=4) as (h, client):
        uploaded = await client.files.create(file=("in.jsonl", requests(400)), purpose="batch")
        batch = await client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        # When it runs, the level never holds more than that waiting
        deepest = 0
        while (await client.batches.retrieve(batch.id)).status not in ENDED:
            low = next(lv for lv in await level_status(redis, keys, h.config) if lv.level == "low")
            deepest = max(deepest, low.depth)
            await asyncio.sleep(0.05)
        done = await client.batches.retrieve(batch.id)
    # Then it completes all the same
    assert done.status == "completed" and done.request_counts and done.request_counts.completed == 400
    assert 0 < deepest <= 30, deepest
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute(
            "SELECT count(DISTINCT custom_id), count(*) FROM messages WHERE batch_id = %s", (batch.id,)
        )
        assert await cur.fetchone() == (400, 400)


async def test_lines_fed_again_after_their_messages_ended_and_left_redis_do_not_run_again(
    redis: aioredis.Redis, keys: Keys, database_url: str
) -> None:
    async with pipeline(redis, keys, database_url, MockSettings(latency_ms=5)) as (h, client):
        # Given a batch of 30 that completed, its messages' status hashes gone from Redis since (archived a
        # while ago)
        uploaded = await client.files.create(file=("in.jsonl", requests(30)), purpose="batch")
        batch = await client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        first = await ended(client, batch.id)
        assert first.status == "completed"
        # (and no idempotency record per line holds Redis memory for a day)
        assert [k async for k in redis.scan_iter(match=f"{keys.prefix}:idem:*")] == []
        for i in range(30):
            await redis.delete(keys.msg(batches.message_id(batch.id, i)))
        # When the batch stage finds it as a crash would leave it: nothing recorded as fed
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
            await conn.execute(
                "UPDATE batches SET status = 'in_progress', fed = 0, feed_chunk = 0, feed_offset = 0 WHERE id = %s",
                (batch.id,),
            )
        again = await ended(client, batch.id)
        out = await lines_of(client, again.output_file_id)
        async with httpx.AsyncClient() as http:
            calls = (await http.get(f"http://127.0.0.1:{h.servers['a'].port}/stats")).json()["calls"]
    # Then it ends completed again, each line once in the same output file, and no line ran twice
    assert again.status == "completed" and again.output_file_id == first.output_file_id
    assert sorted(line["custom_id"] for line in out) == sorted(f"req-{i}" for i in range(30))
    assert calls == 30


async def test_a_line_over_its_tenants_tpm_fails_at_once_and_the_lines_after_it_run_once(
    redis: aioredis.Redis, keys: Keys, database_url: str
) -> None:
    # Given tenant a's tpm of 100,000 and a batch of 10 lines whose second asks for 500,000 tokens (the API
    # refuses such a request with 422: it can never pass)
    env = {"LLMQ_TENANTS": "[{name: a, tpm: 100000}]"}
    async with pipeline(redis, keys, database_url, MockSettings(latency_ms=5), env) as (_, client):
        lines = requests(10).decode().splitlines()
        big = json.loads(lines[1])
        big["body"]["max_tokens"] = 500_000
        lines[1] = json.dumps(big)
        uploaded = await client.files.create(file=("in.jsonl", "\n".join(lines).encode()), purpose="batch")
        batch = await client.batches.create(
            input_file_id=uploaded.id,
            endpoint="/v1/chat/completions",
            completion_window="1h",
            extra_headers={"X-LLMQ-Tenant": "a"},
        )
        # Then the batch completes (the line does not hold it until its window ends), that line failed with
        # why, and every other line ran once and is in the output
        done = await ended(client, batch.id, within=30)
        out, errors = await lines_of(client, done.output_file_id), await lines_of(client, done.error_file_id)
    assert done.status == "completed" and done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (9, 1)
    assert sorted(line["custom_id"] for line in out) == sorted(f"req-{i}" for i in range(10) if i != 1)
    assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [("req-1", "failed")]
    assert "tpm of 100000" in errors[0]["error"]["message"]


async def test_lines_queued_by_a_look_that_was_not_recorded_are_cancelled_or_kept_not_lost(
    redis: aioredis.Redis, keys: Keys, database_url: str
) -> None:
    # Given a batch whose stage queued its 10 lines and crashed before recording it (the look's transaction
    # never committed), the lines then running and completing
    await migrate(database_url)
    async with (
        Harness(redis, keys, backends={"a": MockSettings(latency_ms=5)}, database_url=database_url) as h,
        _api(h, redis, keys) as client,
    ):
        stage = make_batch(config=h.config, redis=redis, keys=keys)
        await stage.pool.open()
        try:
            uploaded = await client.files.create(file=("in.jsonl", requests(10)), purpose="batch")
            batch = await client.batches.create(
                input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="1h"
            )
            await stage.look()  # validating -> in_progress
            row = await batches.get(stage.pool, batch.id)
            assert row is not None and row.status == "in_progress"
            await stage._feed(row, {row.level: 100})  # queued, never recorded

            async def all_archived() -> bool:
                return len(await stage._archived([batches.message_id(batch.id, i) for i in range(10)])) == 10

            await eventually(all_archived, within=20, what="the unrecorded lines run and archived")
            # When the batch is cancelled, and its stage goes on
            assert (await client.batches.cancel(batch.id)).status == "cancelling"
            seen = []
            while (now := await client.batches.retrieve(batch.id)).status not in ENDED:
                seen.append(now.status)
                await stage.look()
            out, errors = await lines_of(client, now.output_file_id), await lines_of(client, now.error_file_id)
        finally:
            await stage.pool.close()
    # Then it went from cancelling to cancelled (as OpenAI's API does), and the ten lines that ran are in the
    # output, none of them listed as never run
    assert set(seen) == {"cancelling"} and now.status == "cancelled"
    assert sorted(line["custom_id"] for line in out) == sorted(f"req-{i}" for i in range(10)) and errors == []
    assert now.request_counts is not None and now.request_counts.completed == 10


async def test_a_file_deleted_while_a_batch_of_it_is_created_leaves_no_batch_without_its_file(
    redis: aioredis.Redis, keys: Keys, database_url: str
) -> None:
    await migrate(database_url)
    async with (
        Harness(redis, keys, backends={"a": MockSettings()}, database_url=database_url, stages=()) as h,
        _api(h, redis, keys) as client,
    ):
        for first in ("delete", "create"):
            uploaded = await client.files.create(file=("in.jsonl", requests(3)), purpose="batch")
            # Given the file's row held (widening the gap between a check and a write), a delete and a batch's
            # creation both waiting on it, one of them first
            async with await psycopg.AsyncConnection.connect(database_url) as holder:
                await holder.execute("SELECT 1 FROM files WHERE id = %s FOR UPDATE", (uploaded.id,))
                fid = uploaded.id
                calls = {
                    "delete": lambda fid=fid: _outcome(client.files.delete(fid)),
                    "create": lambda fid=fid: _outcome(
                        client.batches.create(
                            input_file_id=fid, endpoint="/v1/chat/completions", completion_window="1h"
                        )
                    ),
                }
                then = "create" if first == "delete" else "delete"
                waiting = {first: asyncio.create_task(calls[first]())}
                await asyncio.sleep(0.3)  # (it waits on the row: a lock wait has nothing to await)
                waiting[then] = asyncio.create_task(calls[then]())
                await asyncio.sleep(0.3)
                await holder.commit()
                deleted, created = await waiting["delete"], await waiting["create"]
            # Then never both: the file is gone and no batch was made of it, or the batch is there and the
            # delete was refused
            assert not (deleted == 200 and created == 200), (first, deleted, created)
            assert {deleted, created} in ({200, 404}, {200, 409}), (first, deleted, created)


async def _outcome(call: Any) -> int:
    try:
        await call
    except openai.APIStatusError as exc:
        return exc.status_code
    return 200


async def test_a_batch_that_cannot_move_on_holds_up_no_other(
    redis: aioredis.Redis, keys: Keys, database_url: str
) -> None:
    async with pipeline(redis, keys, database_url, MockSettings(latency_ms=5)) as (_, client):
        # Given a batch whose stored input was damaged after its upload (a line no longer JSON), created first
        damaged = await client.files.create(file=("a.jsonl", requests(5)), purpose="batch")
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
            await conn.execute("UPDATE file_chunks SET data = %s WHERE file_id = %s", (b"{not json\n" * 5, damaged.id))
        stuck = await client.batches.create(
            input_file_id=damaged.id, endpoint="/v1/chat/completions", completion_window="1h"
        )
        # When another batch is created after it
        healthy = await client.files.create(file=("b.jsonl", requests(5)), purpose="batch")
        other = await client.batches.create(
            input_file_id=healthy.id, endpoint="/v1/chat/completions", completion_window="1h"
        )
        # Then the other completes, while the damaged one stays where it is (its error logged each look)
        assert (await ended(client, other.id, within=30)).status == "completed"
        assert (await client.batches.retrieve(stuck.id)).status == "in_progress"
