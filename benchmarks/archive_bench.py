"""Archive throughput: archive stage processes (done stream → COPY + upsert, ack after commit), one and
two of them as an operator scales the stage, against a raw COPY of the same rows into the same table, in
the same run. The raw COPY sends rows already in COPY format, so it measures PostgreSQL alone: the most
any archiver on this machine could do.

    .venv/bin/python -m benchmarks.archive_bench [--redis-url URL] [--database-url DSN] [--n 50000]
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid

import psycopg
import redis.asyncio as aioredis

from benchmarks._procs import drop_prefix, postgres_url, redis_url, stages, write_result
from llmq.pipeline.db import migrate
from llmq.pipeline.keys import Keys
from llmq.pipeline.models import FIELD, Message, Outcome, Status, encode, new_id
from llmq.stages.archive.rows import COLUMNS, copy_rows


def outcomes(n: int) -> list[Outcome]:
    now = time.time()
    out = []
    for i in range(n):
        msg = Message(
            id=new_id(),
            level="normal",
            request={"model": "m", "messages": [{"role": "user", "content": "x" * 200}]},
            enqueued_at=now - 1,
            attempts=1,
        )
        out.append(
            Outcome(
                message=msg,
                status=Status.COMPLETED,
                backend="a",
                response={"choices": [{"message": {"content": f"answer {i}"}}], "usage": {"total_tokens": 60}},
                started_at=now - 0.5,
                finished_at=now,
                prompt_tokens=50,
                completion_tokens=10,
            )
        )
    return out


async def raw_copy(dsn: str, rows: bytes, n: int) -> float:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        await conn.execute("TRUNCATE messages")
        await conn.commit()
        started = time.perf_counter()
        async with conn.cursor().copy(f"COPY messages ({', '.join(COLUMNS)}) FROM STDIN") as copy:
            await copy.write(rows)
        await conn.commit()
        elapsed = time.perf_counter() - started
        await conn.execute("TRUNCATE messages")
        await conn.commit()
    return n / elapsed


async def archive_stage(url: str, dsn: str, items: list[Outcome], batch: int, consumers: int) -> float:
    """Rows/s of ``consumers`` archive processes draining a preloaded done stream, in steady state: from
    the 10% to the 90% row (process start-up and the last batches are not the stage's rate). Every row
    is counted in PostgreSQL at the end."""
    prefix = "{arch" + uuid.uuid4().hex[:6] + "}"
    keys = Keys(prefix)
    redis = aioredis.Redis.from_url(url)
    for i in range(0, len(items), 5000):
        pipe = redis.pipeline(transaction=False)
        for o in items[i : i + 5000]:
            pipe.xadd(keys.done, {FIELD: encode(o)})
        await pipe.execute()
    env = {
        "LLMQ_REDIS_URL": url,
        "LLMQ_DATABASE_URL": dsn,
        "LLMQ_KEY_PREFIX": prefix,
        "LLMQ_LOGGING__LEVEL": "warning",
        "LLMQ_QUEUE__WORKER__MAX_BATCH_SIZE": str(batch),
    }
    n = len(items)
    marks: list[tuple[float, int]] = []
    with stages(env, *[["run", "archive", "--port", "0"]] * consumers):
        while True:
            count = await archived(redis, keys.done)
            if (not marks and count >= n // 10) or count >= n * 9 // 10:
                marks.append((time.perf_counter(), count))
            if count >= n:
                break
            await asyncio.sleep(0.01)
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        count = (await (await conn.execute("SELECT count(*) FROM messages")).fetchone() or [0])[0]
        await conn.execute("TRUNCATE messages")
    assert count == n, f"{count} rows for {n} outcomes"
    await drop_prefix(redis, prefix)
    (t10, c10), (t90, c90) = marks[0], marks[1]
    return (c90 - c10) / (t90 - t10)


async def archived(redis: aioredis.Redis, done: str) -> int:
    """Entries the archive group acked, each after its row committed. Read from Redis: polling
    ``count(*)`` every 10 ms would take PostgreSQL's CPU from the archiver being measured."""
    groups = await redis.xinfo_groups(done)
    return sum(int(g["entries-read"] or 0) - int(g["pending"]) for g in groups if g["name"] == b"archive")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url")
    parser.add_argument("--database-url")
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    items = outcomes(args.n)
    rows = copy_rows(items, store_bodies=True)
    results: dict[str, list[float]] = {"raw_copy": [], "archive_1": [], "archive_2": []}
    with redis_url(args.redis_url) as url, postgres_url(args.database_url) as dsn:
        await migrate(dsn)
        for i in range(args.rounds):
            results["raw_copy"].append(await raw_copy(dsn, rows, len(items)))
            line = f"round {i + 1}: raw COPY {results['raw_copy'][-1]:,.0f} rows/s"
            for consumers in (1, 2):
                rate = await archive_stage(url, dsn, items, args.batch, consumers)
                results[f"archive_{consumers}"].append(rate)
                line += f", {consumers} archive process(es) {rate:,.0f} rows/s"
            print(line, flush=True)
    best = {k: max(v) for k, v in results.items()}
    ratios = {k: best[k] / best["raw_copy"] for k in ("archive_1", "archive_2")}
    print(
        f"best: raw COPY {best['raw_copy']:,.0f} rows/s; archive, 1 process {best['archive_1']:,.0f} rows/s "
        f"({ratios['archive_1']:.2f}x), 2 processes {best['archive_2']:,.0f} rows/s ({ratios['archive_2']:.2f}x)"
    )
    doc = {"benchmark": "archive", "n": args.n, "batch": args.batch, "results": results, "ratios": ratios}
    write_result("archive", doc)


if __name__ == "__main__":
    asyncio.run(main())
