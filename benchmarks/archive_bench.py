"""Archive throughput: the archive stage (done stream → COPY + upsert, ack after commit) against a raw
COPY of the same rows into the same table, in the same run. The raw COPY sends rows already in COPY
format, so it measures PostgreSQL alone: the most any archiver on this machine could do.

    .venv/bin/python -m benchmarks.archive_bench [--redis-url URL] [--database-url DSN] [--n 50000]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time
import uuid

import psycopg
import redis.asyncio as aioredis

from benchmarks._procs import postgres_url, redis_url, write_result
from cli.consume import runner_settings
from cli.stages import make_archive
from pipeline.archive_rows import COLUMNS, copy_rows
from pipeline.config import load_config
from pipeline.db import migrate
from pipeline.keys import Keys
from pipeline.models import FIELD, Message, Outcome, Status, encode, new_id
from pipeline.stage import Runner


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


async def archive_stage(url: str, dsn: str, items: list[Outcome], batch: int) -> float:
    prefix = "{arch" + uuid.uuid4().hex[:6] + "}"
    keys = Keys(prefix)
    redis = aioredis.Redis.from_url(url)
    for i in range(0, len(items), 5000):
        pipe = redis.pipeline(transaction=False)
        for o in items[i : i + 5000]:
            pipe.xadd(keys.done, {FIELD: encode(o)})
        await pipe.execute()
    env = {"LLMQ_DATABASE_URL": dsn, "LLMQ_KEY_PREFIX": prefix, "LLMQ_QUEUE__WORKER__MAX_BATCH_SIZE": str(batch)}
    config = load_config(None, env=env)
    stage = make_archive(config=config, redis=redis, keys=keys)
    await stage.start()
    runner = Runner(stage, redis=redis, keys=keys, consumer="b", settings=runner_settings(config))
    started = time.perf_counter()
    task = asyncio.create_task(runner.run())
    while runner.handled < len(items):  # noqa: ASYNC110 - polling a counter the runner owns
        await asyncio.sleep(0.01)
    elapsed = time.perf_counter() - started
    runner.stop()
    await task
    await stage.close()
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        count = (await (await conn.execute("SELECT count(*) FROM messages")).fetchone() or [0])[0]
        await conn.execute("TRUNCATE messages")
        await conn.commit()
    assert count == len(items), f"{count} rows for {len(items)} outcomes"
    await redis.delete(keys.done)
    await redis.aclose()
    return len(items) / elapsed


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
    gc.freeze()  # the fixtures are not the stage's: keep the collector from walking them during the run
    results: dict[str, list[float]] = {"raw_copy": [], "archive": []}
    with redis_url(args.redis_url) as url, postgres_url(args.database_url) as dsn:
        await migrate(dsn)
        for i in range(args.rounds):
            results["raw_copy"].append(await raw_copy(dsn, rows, len(items)))
            results["archive"].append(await archive_stage(url, dsn, items, args.batch))
            print(f"round {i + 1}: raw COPY {results['raw_copy'][-1]:,.0f} rows/s, "
                  f"archive stage {results['archive'][-1]:,.0f} rows/s", flush=True)  # fmt: skip
    best = {k: max(v) for k, v in results.items()}
    ratio = best["archive"] / best["raw_copy"]
    print(f"best: raw COPY {best['raw_copy']:,.0f} rows/s, archive {best['archive']:,.0f} rows/s, ratio {ratio:.2f}")
    doc = {"benchmark": "archive", "n": args.n, "batch": args.batch, "results": results, "ratio": ratio}
    write_result("archive", doc)


if __name__ == "__main__":
    asyncio.run(main())
