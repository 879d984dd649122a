"""Chaos: the whole pipeline as processes while a driver SIGKILLs and restarts stage processes at random,
the ingest included (the client resends a batch the ingest died on; idempotency keys keep one message each).

Nothing may be lost: every message ends in PostgreSQL exactly once, completed with its backend response,
and no entry is left pending in any group. Duplicate backend calls are allowed (at-least-once), but only
for entries a consumer took over from a killed one (reclaimed, or re-read by its restarted self).
"""

from __future__ import annotations

import asyncio
import os
import random
import time

import httpx
import psycopg
import pytest
import redis.asyncio as aioredis

from llmq.pipeline.keys import Keys
from tests.conftest import eventually, free_port
from tests.support.harness import CHAT
from tests.support.procs import Proc, llmq_stage, stop_all
from tests.support.settle import LEVELS, archived_rows, describe_streams, groups_settled

# `make soak` runs the same scenario longer through these variables.
MESSAGES = int(os.environ.get("CHAOS_MESSAGES", "3000"))
KILLS = int(os.environ.get("CHAOS_KILLS", "10"))
KILL_EVERY_S = 0.5
BATCH = 500
KILLABLE = ("ingest", "schedule", "dispatch", "dispatch", "retry", "archive")
TAKEN_OVER = ("reclaimed ", "re-reading ", "took over ")
"""How a consumer's log says it took entries over from a killed one (or re-read its own after a restart)."""


def start(env: dict[str, str], stage: str) -> Proc:
    """A stage process: ingest on the API port of ``env``, the others with an ops port of their own."""
    return llmq_stage(env, "run", "ingest") if stage == "ingest" else llmq_stage(env, "run", stage, "--port", "0")


def taken_over(procs: list[Proc], stage: str) -> int:
    """Entries of ``stage``'s group that a consumer took over from a killed one, from the processes' logs."""
    return sum(
        int(line.get("entries", 0))
        for proc in procs
        for line in proc.lines()
        if line.get("stage") == stage and str(line.get("msg", "")).startswith(TAKEN_OVER)
    )


@pytest.mark.timeout(180 + MESSAGES // 25)
async def test_random_sigkills_lose_nothing_and_duplicate_only_taken_over_calls(
    redis: aioredis.Redis, keys: Keys, stage_env: dict[str, str], database_url: str
) -> None:
    # Given every stage as its own process (two dispatchers), and a backend with 20 ms calls
    mock_port, api_port = free_port(), free_port()
    env = {
        **stage_env,
        "LLMQ_DATABASE_URL": database_url,
        "LLMQ_SERVER__HOST": "127.0.0.1",
        "LLMQ_SERVER__PORT": str(api_port),
        "LLMQ_QUEUE__DEFAULT_MAX_SIZE": str(MESSAGES),
        "LLMQ_BACKENDS": f'[{{name: mock, url: "http://127.0.0.1:{mock_port}/v1", max_concurrent: 32}}]',
    }
    mock = llmq_stage(env, "run", "mock-backend", "--port", str(mock_port), "--latency-ms", "20")
    running: list[Proc] = [start(env, stage) for stage in KILLABLE]
    every: list[Proc] = [mock, *running]
    rng = random.Random(7)
    kills = resent = 0
    try:
        for stage, proc in zip(KILLABLE, running, strict=True):
            if stage == "ingest":
                proc.wait_for_log_text("ingest listening", timeout=30)
            else:
                proc.wait_for_log("stage started", timeout=30)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api_port}", timeout=30) as http:
            # When thousands of messages go in, in batches spread over the whole run, each message with an
            # idempotency key so that a client can resend a batch the ingest died on
            ids: list[str] = []

            async def submit(items: list[dict[str, object]]) -> list[dict[str, object]]:
                nonlocal resent
                for _ in range(300):
                    try:
                        response = await http.post("/api/v1/messages/batch", json=items)
                        if response.status_code == 200:
                            results: list[dict[str, object]] = response.json()
                            return results
                    except httpx.TransportError:
                        pass
                    resent += 1
                    await asyncio.sleep(0.1)
                raise AssertionError("the ingest did not come back within 30 s")

            async def submit_all() -> None:
                pause = KILLS * KILL_EVERY_S / max(1, MESSAGES // BATCH)
                for first in range(0, MESSAGES, BATCH):
                    items: list[dict[str, object]] = [
                        {"level": rng.choice(LEVELS), "request": CHAT, "idempotency_key": f"chaos-{first + i}"}
                        for i in range(min(BATCH, MESSAGES - first))
                    ]
                    results = await submit(items)
                    # accepted now, or already accepted before the ingest died (a duplicate, same id)
                    assert all(r["status_code"] in (200, 202) for r in results), results[:3]
                    ids.extend(str(r["id"]) for r in results)
                    await asyncio.sleep(pause)

            # and a driver SIGKILLs a random stage process every 0.5 s and starts a new one in its place
            async def kill_some() -> None:
                nonlocal kills
                while kills < KILLS:
                    await asyncio.sleep(KILL_EVERY_S)
                    slot = rng.randrange(len(running))
                    running[slot].kill()
                    kills += 1
                    running[slot] = start(env, KILLABLE[slot])
                    every.append(running[slot])

            started = time.monotonic()
            await asyncio.gather(submit_all(), kill_some())
            last_kill = time.monotonic()
            assert len(ids) == len(set(ids)) == MESSAGES  # one message per key, resent or not

            # Then every message is archived exactly once with a terminal status (the archive writes only
            # outcomes), and every completed one with its backend response
            async def all_archived() -> bool:
                return await archived_rows(database_url) == MESSAGES

            try:
                await eventually(
                    all_archived, within=60 + MESSAGES / 25, interval=0.5, what=f"{MESSAGES} archived rows"
                )
            except BaseException:
                print(await describe_streams(redis, keys, database_url))
                raise
            run_s, recovery_s = time.monotonic() - started, time.monotonic() - last_kill
            async with await psycopg.AsyncConnection.connect(database_url) as conn:
                cur = await conn.execute(
                    "SELECT count(*), count(DISTINCT id) FROM messages WHERE id = ANY(%s::uuid[])", (ids,)
                )
                assert await cur.fetchone() == (MESSAGES, MESSAGES)
                cur = await conn.execute("SELECT status, count(*), count(response) FROM messages GROUP BY status")
                by_status = {status: (n, with_response) for status, n, with_response in await cur.fetchall()}
            completed, with_response = by_status.get("completed", (0, 0))
            assert completed == with_response
            # a message only ends otherwise when kills redelivered it more than max_deliveries times (poison)
            assert set(by_status) <= {"completed", "dead"}, by_status

            # and nothing is left pending or undelivered in any group
            await eventually(
                lambda: groups_settled(redis, keys), within=30, interval=0.2, what="every group to ack everything"
            )
            stats = (await http.get(f"http://127.0.0.1:{mock_port}/stats")).json()
    finally:
        stop_all(every)
    # Duplicate backend calls happen only for dispatch entries taken over from a killed dispatcher
    assert stats["messages"] >= completed
    # and thousands of backend calls did not write a log line each
    assert not any("HTTP Request:" in proc.text() for proc in every)
    assert stats["duplicates"] <= taken_over(every, "dispatch"), (stats, taken_over(every, "dispatch"))
    print(
        f"chaos: {MESSAGES} messages ({by_status}), {kills} SIGKILLs, {resent} batch posts resent, "
        f"{stats['duplicates']} duplicate backend calls "
        f"({taken_over(every, 'dispatch')} dispatch entries taken over), 0 lost; all archived {run_s:.1f}s after "
        f"the first kill, {recovery_s:.1f}s after the last"
    )
