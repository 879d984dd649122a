"""End to end: HTTP batch ingest → schedule → dispatch → archive, until the last row is committed in
PostgreSQL, beside the hand-written ceiling (producer → stream → mover → stream → sink) and beside
Dramatiq and Celery draining as many no-op jobs, all measured in the same run on the same Redis.

Every stage runs as its own process (ingest, schedule, dispatch, retry, archive). Two backend kinds:
``echo`` answers inside the dispatcher (no network: the figure is the queue's own), ``mock`` is the
mock backend over HTTP with no latency.

    .venv/bin/python -m benchmarks.e2e_bench [--redis-url URL] [--database-url DSN] [--n 20000]

Prints figures and writes JSON to benchmarks/out/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from typing import Any

import httpx
import psutil
import psycopg
import redis.asyncio as aioredis

from benchmarks._procs import (
    drop_prefix,
    free_port,
    machine,
    poll_until,
    postgres_url,
    redis_url,
    run_env,
    stages,
    write_result,
)
from benchmarks.peers import peer
from benchmarks.runtime_throughput import ceiling_with_producer
from llmq.pipeline.keys import Keys

CHAT = {"model": "m", "messages": [{"role": "user", "content": "x" * 200}], "max_tokens": 16}
BATCH = 1000
SLOTS = 1200
"""In-flight slots of the one level and the one backend; a dispatcher holds half of them. The echo backend
has no capacity of its own, so this is the queue's parallelism alone. Swept on 2 cores (three runs each,
20,000 messages): 400 slots 2,335-2,595 msgs/s, 800 2,899-3,438, 1200 2,511-3,924, 1600 3,034-3,615;
with the mock backend over HTTP every size gave 600-850 (httpx is its limit)."""
TARGET_RATIO = 0.25
TARGET_PEER_MULTIPLE = 5.0


async def hand_written_ceiling(url: str, n: int) -> float:
    r = aioredis.Redis.from_url(url)
    keys = Keys("{ceil" + uuid.uuid4().hex[:6] + "}")
    a, b = keys.level("a"), keys.level("b")
    try:
        return await ceiling_with_producer(r, a, b, n, 100)
    finally:
        await r.delete(a, b)
        await r.aclose()


async def archived(dsn: str) -> int:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        try:
            cur = await conn.execute("SELECT count(*) FROM messages")
        except psycopg.errors.UndefinedTable:
            return 0
        row = await cur.fetchone()
        return int(row[0]) if row else 0


async def end_to_end(
    url: str, dsn: str, n: int, backend: str, *, backend_url: str | None = None, slots: int = SLOTS, in_hand: int = 0
) -> dict[str, Any]:
    """msgs/s from the first POST to the moment the n-th row is in PostgreSQL. ``backend``: ``echo``, ``mock``
    (started here) or a name for ``backend_url``; ``slots`` bounds the calls in flight, ``in_hand`` what one
    dispatcher holds (half the slots when 0)."""
    prefix = "{e2e" + uuid.uuid4().hex[:6] + "}"
    api, mock = free_port(), free_port()
    if backend_url is None:
        backend_url = "echo://local/v1" if backend == "echo" else f"http://127.0.0.1:{mock}/v1"
    env = run_env(url, prefix, api) | {
        "LLMQ_DATABASE_URL": dsn,
        "LLMQ_QUEUE__DEFAULT_MAX_SIZE": str(n),
        "LLMQ_QUEUE__WORKER__MAX_CONCURRENT": str(in_hand or slots // 2),
        "LLMQ_QUEUE__LEVELS": f"[{{name: normal, priority: 1, max_wait_time: 30s, max_concurrent: {slots}}}]",
        "LLMQ_BACKENDS": f'[{{name: {backend}, url: "{backend_url}", max_concurrent: {slots}}}]',
    }
    argvs = [["run", "ingest"]] + [["run", s, "--port", "0"] for s in ("schedule", "dispatch", "retry", "archive")]
    if backend == "mock":
        argvs.append(["run", "mock-backend", "--port", str(mock), "--latency-ms", "0"])
    with stages(env, *argvs) as procs:
        cpu = {argv[1]: psutil.Process(p.pid) for argv, p in zip(argvs, procs, strict=True)}
        cpu_before = {name: sum(p.cpu_times()[:2]) for name, p in cpu.items()}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api}", timeout=60) as http:
            before = await archived(dsn)
            items = [{"level": "normal", "request": CHAT}] * BATCH
            started = time.perf_counter()
            for _ in range(n // BATCH):
                response = await http.post("/api/v1/messages/batch", json=items)
                assert all(r["status_code"] == 202 for r in response.json()), response.text[:300]
            accepted_s = time.perf_counter() - started

            async def all_archived() -> bool:
                return await archived(dsn) >= before + n

            await poll_until(all_archived, timeout_s=600, what=f"{n} archived rows")
            elapsed = time.perf_counter() - started
        cpu_s = {name: round(sum(p.cpu_times()[:2]) - cpu_before[name], 2) for name, p in cpu.items()}
    r = aioredis.Redis.from_url(url)
    await drop_prefix(r, prefix)
    return {
        "backend": backend,
        "n": n,
        "msgs_per_s": n / elapsed,
        "seconds": elapsed,
        "ingest_seconds": accepted_s,
        "cpu_seconds": cpu_s,
    }


async def run(url: str, dsn: str, n: int) -> dict[str, Any]:
    print(f"e2e: ceiling, {n} messages ...", flush=True)
    ceiling = await hand_written_ceiling(url, n)
    print(f"  hand-written ceiling {ceiling:,.0f} msgs/s", flush=True)
    runs = {}
    for backend in ("echo", "mock"):
        print(f"e2e: llmq with the {backend} backend, {n} messages ...", flush=True)
        runs[backend] = await end_to_end(url, dsn, n, backend)
        ratio = runs[backend]["msgs_per_s"] / ceiling
        runs[backend]["ratio_to_ceiling"] = ratio
        print(f"  llmq ({backend}) {runs[backend]['msgs_per_s']:,.0f} msgs/s = {ratio:.3f}x the ceiling", flush=True)
    peers = {}
    for kind in ("dramatiq", "celery"):
        print(f"peers: {kind}, {n} no-op jobs ...", flush=True)
        peers[kind] = await peer(kind, url, n)
        print(f"  {kind} {peers[kind]['jobs_per_s']:,.0f} jobs/s", flush=True)
    best_peer = max(p["jobs_per_s"] for p in peers.values())
    multiple = runs["echo"]["msgs_per_s"] / best_peer
    print(f"  llmq (echo) end to end = {multiple:.3f}x the best peer", flush=True)
    return {
        "ceiling_msgs_per_s": ceiling,
        "target_ratio": TARGET_RATIO,
        "runs": runs,
        "peers": peers,
        "llmq_over_best_peer": multiple,
        "target_peer_multiple": TARGET_PEER_MULTIPLE,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url")
    parser.add_argument("--database-url")
    parser.add_argument("--n", type=int, default=20_000, help=f"messages (a multiple of {BATCH})")
    args = parser.parse_args()
    with redis_url(args.redis_url) as url, postgres_url(args.database_url) as dsn:
        doc = {"benchmark": "e2e", **await run(url, dsn, args.n), "machine": machine()}
    print(json.dumps({k: doc[k] for k in ("runs", "peers")}, indent=2))
    write_result("e2e", doc)


if __name__ == "__main__":
    asyncio.run(main())
