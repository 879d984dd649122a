"""Through an HTTP backend that costs almost nothing (nginx answering every request with one fixed
completion, one worker process), so what is measured is the caller, not the backend. In one run:

1. **bare**: one process with aiohttp posting to the backend at C calls in flight (the reference).
2. **llmq**: N messages through ingest (batch POSTs), schedule, dispatch and archive, each its own process,
   with C backend slots, until the N-th row is in PostgreSQL. Target: at least half the bare client's rate.
3. **peers**: a Dramatiq actor and a Celery task doing the same job (POST the request to the backend, store the
   answer as a row in PostgreSQL), 2 worker processes x 8 threads each. Target: llmq at least 3x the best.

    .venv/bin/python -m benchmarks.http_bench [--redis-url URL] [--database-url DSN] [--n 20000] [--in-flight 64]

Needs Debian's nginx-light. Prints figures and writes JSON to benchmarks/out/.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from typing import Any

import aiohttp
import psycopg

from benchmarks._procs import machine, nginx_backend, postgres_url, redis_url, write_result
from benchmarks.e2e_bench import BATCH, end_to_end
from benchmarks.http_clients import BODY, HEADERS
from benchmarks.peers import peer

TARGET_OVER_BARE = 0.5
TARGET_PEER_MULTIPLE = 3.0


async def bare(base: str, n: int, in_flight: int) -> float:
    """Calls per second: ``n`` POSTs with ``in_flight`` callers on one aiohttp session."""
    left = n
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=in_flight)) as session:

        async def caller() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                async with session.post(base + "/chat/completions", data=BODY, headers=HEADERS) as response:
                    response.raise_for_status()
                    await response.read()

        started = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(in_flight)))
        return n / (time.perf_counter() - started)


async def peers(url: str, dsn: str, base: str, n: int) -> dict[str, Any]:
    table = f"peer_replies_{uuid.uuid4().hex[:8]}"
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(f"CREATE TABLE {table} (id bigserial PRIMARY KEY, request jsonb, response jsonb)")
    extra = {"PEER_BACKEND_URL": base, "PEER_DATABASE_URL": dsn, "PEER_TABLE": table}
    try:
        out = {}
        for kind in ("dramatiq", "celery"):
            print(f"peers: {kind}, {n} calls stored ...", flush=True)
            out[kind] = await peer(kind, url, n, job="call", extra=extra)
            print(f"  {kind} {out[kind]['jobs_per_s']:,.0f} jobs/s", flush=True)
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            cur = await conn.execute(f"SELECT count(*) FROM {table}")
            row = await cur.fetchone()
        assert row is not None and row[0] == 2 * (n + 1), f"{row} rows stored, expected {2 * (n + 1)}"
        return out
    finally:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            await conn.execute(f"DROP TABLE {table}")


async def run(url: str, dsn: str, n: int, in_flight: int, peer_n: int) -> dict[str, Any]:
    with nginx_backend() as base:
        await bare(base, 2000, in_flight)  # warm
        print(f"bare aiohttp, {n} calls at {in_flight} in flight ...", flush=True)
        reference = await bare(base, n, in_flight)
        print(f"  {reference:,.0f} calls/s", flush=True)
        print(f"llmq, {n} messages, {in_flight} backend slots ...", flush=True)
        llmq = await end_to_end(url, dsn, n, "nginx", backend_url=base, slots=in_flight, in_hand=in_flight)
        over_bare = llmq["msgs_per_s"] / reference
        print(f"  {llmq['msgs_per_s']:,.0f} msgs/s archived = {over_bare:.3f}x bare (target {TARGET_OVER_BARE})")
        print(f"  CPU seconds by process: {llmq['cpu_seconds']}", flush=True)
        others = await peers(url, dsn, base, peer_n)
    best = max(p["jobs_per_s"] for p in others.values())
    multiple = llmq["msgs_per_s"] / best
    print(f"  llmq = {multiple:.2f}x the best peer (target {TARGET_PEER_MULTIPLE})", flush=True)
    return {
        "in_flight": in_flight,
        "bare_calls_per_s": reference,
        "llmq": llmq,
        "llmq_over_bare": over_bare,
        "peers": others,
        "llmq_over_best_peer": multiple,
        "targets": {"over_bare": TARGET_OVER_BARE, "peer_multiple": TARGET_PEER_MULTIPLE},
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url")
    parser.add_argument("--database-url")
    parser.add_argument(
        "--n", type=int, default=20_000, help=f"messages through llmq and bare calls (a multiple of {BATCH})"
    )
    parser.add_argument("--peer-n", type=int, default=5_000, help="jobs through each peer")
    parser.add_argument("--in-flight", type=int, default=64, help="calls in flight at the backend")
    args = parser.parse_args()
    with redis_url(args.redis_url) as url, postgres_url(args.database_url) as dsn:
        doc = {"benchmark": "http", **await run(url, dsn, args.n, args.in_flight, args.peer_n), "machine": machine()}
    print(f"wrote {write_result('http', doc)}")


if __name__ == "__main__":
    asyncio.run(main())
