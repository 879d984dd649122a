"""Lost replies end to end: every stage as its own process, talking to Redis and PostgreSQL through fault
proxies that drop replies after the request ran, cut requests in half and stall replies, at random.

Nothing may happen twice and nothing may be lost: each accepted POST is one message, each message one
archived row, each message one backend call (no process is killed here, so no entry is ever taken over
from a dead consumer), and every group has acked everything at the end. ``make soak`` runs it longer.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import httpx
import psycopg
import pytest
import redis.asyncio as aioredis
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from llmq.pipeline.keys import Keys
from tests.conftest import eventually, free_port
from tests.support.faults import FaultProxy
from tests.support.harness import CHAT
from tests.support.procs import Proc, llmq_stage, stop_all
from tests.support.settle import LEVELS, archived_rows, describe_streams, groups_settled

MESSAGES = int(os.environ.get("FAULT_MESSAGES", "2000"))
BATCH = 100
REDIS_FAULTS = {"drop": 0.01, "reset": 0.005, "stall": 0.01}
"""Per request relayed to Redis: its reply dropped after it ran, the request cut in half, or its reply held."""
POSTGRES_FAULTS = {"drop": 0.05, "reset": 0.02}
STAGES = ("ingest", "schedule", "dispatch", "dispatch", "retry", "archive")


@pytest.fixture
async def redis_proxy(redis_url: str) -> AsyncIterator[FaultProxy]:
    where = urlsplit(redis_url)
    if where.scheme != "redis":
        pytest.skip("the fault proxy relays plain TCP")
    async with FaultProxy(where.hostname or "127.0.0.1", where.port or 6379) as proxy:
        yield proxy


@pytest.fixture
async def postgres_proxy(database_url: str) -> AsyncIterator[FaultProxy]:
    info = conninfo_to_dict(database_url)
    host, port = str(info.get("host") or "127.0.0.1"), int(info.get("port") or 5432)
    if host.startswith("/"):
        host = f"{host}/.s.PGSQL.{port}"  # an embedded server's unix socket
    async with FaultProxy(host, port) as proxy:
        yield proxy


@pytest.mark.timeout(240 + MESSAGES // 20)
async def test_random_lost_replies_lose_nothing_and_run_nothing_twice(
    redis: aioredis.Redis,
    keys: Keys,
    stage_env: dict[str, str],
    database_url: str,
    redis_proxy: FaultProxy,
    postgres_proxy: FaultProxy,
) -> None:
    # Given every stage as its own process (two dispatchers), on Redis and PostgreSQL through fault proxies
    mock_port, api_port = free_port(), free_port()
    db = urlsplit(str(stage_env["LLMQ_REDIS_URL"])).path or "/0"
    env = {
        **stage_env,
        "LLMQ_REDIS_URL": redis_proxy.url(path=db),
        "LLMQ_DATABASE_URL": make_conninfo(database_url, host="127.0.0.1", port=postgres_proxy.port),
        "LLMQ_QUEUE__WORKER__CLAIM_TIMEOUT": "10s",  # nothing is killed: nothing may be taken over
        "LLMQ_SERVER__HOST": "127.0.0.1",
        "LLMQ_SERVER__PORT": str(api_port),
        "LLMQ_QUEUE__DEFAULT_MAX_SIZE": str(MESSAGES),
        "LLMQ_BACKENDS": f'[{{name: mock, url: "http://127.0.0.1:{mock_port}/v1", max_concurrent: 32}}]',
    }
    mock = llmq_stage(env, "run", "mock-backend", "--port", str(mock_port), "--latency-ms", "10")
    procs: list[Proc] = [mock]
    for stage in STAGES:
        procs.append(
            llmq_stage(env, "run", stage) if stage == "ingest" else llmq_stage(env, "run", stage, "--port", "0")
        )
    rng = random.Random(16)
    try:
        procs[1].wait_for_log_text("ingest listening", timeout=30)
        for proc in procs[2:]:
            proc.wait_for_log("stage started", timeout=30)
        # and faults from now on
        redis_proxy.chaos(**REDIS_FAULTS)
        postgres_proxy.chaos(**POSTGRES_FAULTS)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api_port}", timeout=30) as http:
            # When clients send thousands of messages: half in batches with idempotency keys (a batch is sent
            # again, with the same keys, until it is answered), half one by one without a key (never resent)
            keyed: list[str] = []
            keyless: list[str] = []
            unanswered = 0

            async def batches() -> None:
                for first in range(0, MESSAGES // 2, BATCH):
                    items = [
                        {"level": rng.choice(LEVELS), "request": CHAT, "idempotency_key": f"f-{first + i}"}
                        for i in range(min(BATCH, MESSAGES // 2 - first))
                    ]
                    for _ in range(100):
                        try:
                            response = await http.post("/api/v1/messages/batch", json=items)
                        except httpx.TransportError:
                            continue
                        if response.status_code == 200:
                            results = response.json()
                            if all(r["status_code"] in (200, 202) for r in results):
                                keyed.extend(str(r["id"]) for r in results)
                                break
                        await asyncio.sleep(0.1)
                    else:
                        raise AssertionError("a batch was never accepted")

            async def singles(worker: int) -> None:
                nonlocal unanswered
                for _ in range(worker, MESSAGES - MESSAGES // 2, 8):
                    try:
                        response = await http.post(
                            "/api/v1/messages", json={"level": rng.choice(LEVELS), "request": CHAT}
                        )
                    except httpx.TransportError:
                        unanswered += 1
                        continue
                    if response.status_code == 202:
                        keyless.append(str(response.json()["id"]))
                    else:
                        unanswered += 1  # 503: the client cannot tell whether it was queued

            started = time.monotonic()
            await asyncio.gather(batches(), *(singles(w) for w in range(8)))
            ids = keyed + keyless
            # Then each accepted POST is one message
            assert len(keyed) == len(set(keyed)) == MESSAGES // 2
            assert len(ids) == len(set(ids))

            # and each message ends in exactly one archived row, completed with its response
            async def all_archived() -> bool:
                return await archived_rows(database_url) >= len(ids)

            try:
                await eventually(all_archived, within=120, interval=0.5, what=f"{len(ids)} archived rows")
                await eventually(
                    lambda: groups_settled(redis, keys), within=60, interval=0.2, what="every group settled"
                )
            except BaseException:
                print(await describe_streams(redis, keys, database_url))
                for proc in procs:  # what each stage had to say beyond "info"
                    lines = [line for line in proc.lines() if line.get("level") not in (None, "info", "debug")]
                    print(f"== {proc.popen.args[3:5]} exit {proc.popen.poll()}: {len(lines)} warnings and errors")
                    for line in lines[-10:]:
                        print("  ", str(line.get("msg"))[:200], str(line.get("exc", ""))[-300:])
                raise
            elapsed = time.monotonic() - started
            redis_proxy.chaos()
            postgres_proxy.chaos()
            async with await psycopg.AsyncConnection.connect(database_url) as conn:
                cur = await conn.execute(
                    "SELECT count(*), count(DISTINCT id) FROM messages WHERE id = ANY(%s::uuid[])", (ids,)
                )
                assert await cur.fetchone() == (len(ids), len(ids))
                cur = await conn.execute("SELECT status, count(*), count(response) FROM messages GROUP BY status")
                by_status = {status: (n, with_response) for status, n, with_response in await cur.fetchall()}
            rows = sum(n for n, _ in by_status.values())
            # (a POST answered with an error may still have queued its message: at most one row each)
            assert len(ids) <= rows <= len(ids) + unanswered
            assert set(by_status) == {"completed"} and by_status["completed"][0] == by_status["completed"][1]
            stats = (await http.get(f"http://127.0.0.1:{mock_port}/stats")).json()
    finally:
        stop_all(procs)
    # and each message was sent to the backend once
    assert stats["duplicates"] == 0 and stats["messages"] == rows, stats
    # while the proxies really did drop, cut and stall
    assert redis_proxy.counts.dropped_replies >= 10 and redis_proxy.counts.resets >= 5, redis_proxy.counts
    assert postgres_proxy.counts.dropped_replies + postgres_proxy.counts.resets >= 1, postgres_proxy.counts
    print(
        f"faults: {MESSAGES} messages ({len(keyed)} keyed, {len(keyless)} keyless accepted, {unanswered} unanswered), "
        f"{rows} rows, 0 duplicate calls; redis {redis_proxy.counts}, postgres {postgres_proxy.counts}; "
        f"all archived {elapsed:.1f}s after the first POST"
    )
