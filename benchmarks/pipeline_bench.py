"""The queue end to end, as separate stage processes on one machine.

1. Idle latency: one message at a time through schedule → dispatch (a mock backend answering at once) →
   archive; p50/p99 of enqueue → dispatch start, → finished, → archived row.
2. Priority under overload: three mock backends with fixed latency and slots, offered twice their
   capacity in the 5/15/40/40 realtime/high/normal/low mix; goodput as a fraction of capacity, p50/p99
   queue wait (enqueue → admission) per level, and SLO misses.

    .venv/bin/python benchmarks/pipeline_bench.py [--redis-url URL] [--database-url DSN] [--seconds 20]

Messages are submitted with the ingest stage's own Submitter (no HTTP, so the figures are the queue's).
Prints figures and writes JSON to benchmarks/out/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
import uuid
from typing import Any

import psycopg
import redis.asyncio as aioredis

from benchmarks._procs import drop_prefix, free_port, machine, pct, postgres_url, redis_url, stages, write_result
from benchmarks.plots import plot_waits
from llmq.pipeline.config import load_config
from llmq.pipeline.keys import Keys
from llmq.pipeline.models import encode, new_id
from llmq.pipeline.notify import Waiter
from llmq.pipeline.submit import Submission, Submitter, new_message

CHAT = {"model": "m", "messages": [{"role": "user", "content": "x" * 200}], "max_tokens": 16}
MIX = (("realtime", 0.05), ("high", 0.15), ("normal", 0.40), ("low", 0.40))


async def idle_latency(url: str, dsn: str, n: int) -> dict[str, Any]:
    prefix = "{idle" + uuid.uuid4().hex[:6] + "}"
    mock = free_port()
    env = {
        "LLMQ_REDIS_URL": url,
        "LLMQ_DATABASE_URL": dsn,
        "LLMQ_KEY_PREFIX": prefix,
        "LLMQ_LOGGING__LEVEL": "warning",
        "LLMQ_BACKENDS": f'[{{name: m, url: "http://127.0.0.1:{mock}/v1", max_concurrent: 8}}]',
    }
    argvs = [["run", "mock-backend", "--port", str(mock), "--latency-ms", "0"]]
    argvs += [["run", s, "--port", "0"] for s in ("schedule", "dispatch", "archive")]
    redis = aioredis.Redis.from_url(url)
    keys = Keys(prefix)
    config = load_config(None, env=env)
    submitter = Submitter(config, redis=redis, keys=keys)
    waiter = Waiter(redis=redis, keys=keys)
    waiter.start()
    ids = []
    with stages(env, *argvs):
        for i in range(n + 20):
            msg = new_message(message_id=new_id(), level="high", request=CHAT)
            await submitter.submit(Submission(msg, encode(msg)))

            async def done(mid: str = msg.id) -> bool:
                return await redis.hget(keys.msg(mid), "status") == b"completed"

            await waiter.wait(msg.id, done, 10)
            if i >= 20:  # warm-up: connections, script caches
                ids.append(msg.id)
            await asyncio.sleep(0.01)
        await asyncio.sleep(2)  # let the archive commit the last ones
    await waiter.close()
    start, finish = [], []
    for mid in ids:
        h = {k.decode(): v.decode() for k, v in (await redis.hgetall(keys.msg(mid))).items()}
        start.append((float(h["started_at"]) - float(h["enqueued_at"])) * 1000)
        finish.append((float(h["finished_at"]) - float(h["enqueued_at"])) * 1000)
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(
            "SELECT extract(epoch FROM archived_at - enqueued_at) * 1000 FROM messages WHERE id = ANY(%s)",
            ([uuid.UUID(i) for i in ids],),
        )
        archived = [float(r[0]) for r in await cur.fetchall()]
        await conn.execute("DELETE FROM messages WHERE id = ANY(%s)", ([uuid.UUID(i) for i in ids],))
    await drop_prefix(redis, prefix)
    return {
        "n": len(ids),
        "to_dispatch_start_ms": {"p50": pct(start, 0.5), "p99": pct(start, 0.99)},
        "to_finished_ms": {"p50": pct(finish, 0.5), "p99": pct(finish, 0.99)},
        "to_archived_ms": {"p50": pct(archived, 0.5), "p99": pct(archived, 0.99), "rows": len(archived)},
    }


async def overload(
    url: str, seconds: float, latency_ms: int, slots: int, reserved: int, jitter_ms: int = 0
) -> dict[str, Any]:
    prefix = "{load" + uuid.uuid4().hex[:6] + "}"
    ports = [free_port() for _ in range(3)]
    backends = ", ".join(
        f'{{name: b{i}, url: "http://127.0.0.1:{p}/v1", max_concurrent: {slots}}}' for i, p in enumerate(ports)
    )
    capacity_slots = 3 * slots
    env = {
        "LLMQ_REDIS_URL": url,
        "LLMQ_KEY_PREFIX": prefix,
        "LLMQ_LOGGING__LEVEL": "warning",
        "LLMQ_BACKENDS": f"[{backends}]",
        "LLMQ_QUEUE__LEVELS": (
            f"[{{name: realtime, priority: 1, max_wait_time: 100ms, max_concurrent: {capacity_slots},"
            f" reserved: {reserved}}},"
            f" {{name: high, priority: 2, max_wait_time: 5s, max_concurrent: {capacity_slots}}},"
            f" {{name: normal, priority: 3, max_wait_time: 30s, max_concurrent: {capacity_slots}}},"
            f" {{name: low, priority: 4, max_wait_time: 120s, max_concurrent: {capacity_slots}}}]"
        ),
    }
    argvs = [
        ["run", "mock-backend", "--port", str(p), "--latency-ms", str(latency_ms), "--jitter-ms", str(jitter_ms)]
        for p in ports
    ]
    argvs += [["run", "schedule", "--port", "0"], ["run", "dispatch", "--port", "0"], ["run", "retry", "--port", "0"]]
    redis = aioredis.Redis.from_url(url)
    keys = Keys(prefix)
    config = load_config(None, env=env)
    submitter = Submitter(config, redis=redis, keys=keys)
    capacity_per_s = capacity_slots / (latency_ms / 1000)
    offered_per_s = 2 * capacity_per_s
    sent: list[tuple[str, str]] = []
    rng = random.Random(7)
    with stages(env, *argvs):
        started = time.time()
        tick = 0.05
        while time.time() - started < seconds:
            batch = []
            for _ in range(round(offered_per_s * tick)):
                r, acc = rng.random(), 0.0
                level = MIX[-1][0]
                for name, share in MIX:
                    acc += share
                    if r < acc:
                        level = name
                        break
                batch.append(new_message(message_id=new_id(), level=level, request=CHAT))
            await submitter.submit_many([Submission(m, encode(m)) for m in batch])
            sent += [(m.id, m.level) for m in batch]
            await asyncio.sleep(max(0.0, started + (len(sent) / offered_per_s) - time.time()))
        ended = time.time()
        await asyncio.sleep(latency_ms / 1000 * 2)
    waits: dict[str, list[float]] = {level: [] for level, _ in MIX}
    series: dict[str, list[tuple[float, float]]] = {level: [] for level, _ in MIX}
    unadmitted = dict.fromkeys(waits, 0)
    completed_in_window = 0
    warm = started + 2
    pipe = redis.pipeline(transaction=False)
    for mid, _ in sent:
        pipe.hmget(keys.msg(mid), "enqueued_at", "scheduled_at", "finished_at", "status", "error", "attempts")
    errors: dict[str, int] = {}
    retried = 0
    for (_, level), (enq, sched, fin, status, error, attempts) in zip(sent, await pipe.execute(), strict=True):
        if error:
            text = error.decode()[:120]
            errors[text] = errors.get(text, 0) + 1
        retried += int(attempts or 0) > 1
        if sched is None:
            unadmitted[level] += 1
        else:
            waits[level].append(float(sched) - float(enq))
            series[level].append((float(enq) - started, float(sched) - float(enq)))
        if status == b"completed" and fin is not None and warm <= float(fin) <= ended:
            completed_in_window += 1
    await drop_prefix(redis, prefix)
    slo = {lv.name: lv.max_wait_time.seconds for lv in config.queue.levels}
    plot_waits(series, slo)
    return {
        "capacity_msgs_per_s": capacity_per_s,
        "realtime_reserved_slots": reserved,
        "latency_jitter_ms": jitter_ms,
        "offered_msgs_per_s": offered_per_s,
        "seconds": seconds,
        "sent": len(sent),
        "goodput_fraction": completed_in_window / ((ended - warm) * capacity_per_s),
        "messages_retried": retried,
        "errors": dict(sorted(errors.items(), key=lambda kv: -kv[1])[:5]),
        "queue_wait_s": {
            level: {
                "admitted": len(w),
                "not_admitted_by_end": unadmitted[level],
                "p50": pct(w, 0.5),
                "p99": pct(w, 0.99),
                "slo_s": slo[level],
                "slo_misses": sum(x > slo[level] for x in w),
            }
            for level, w in waits.items()
        },
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url")
    parser.add_argument("--database-url")
    parser.add_argument("--idle-n", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--latency-ms", type=int, default=200)
    parser.add_argument("--slots", type=int, default=4, help="concurrent calls per mock backend (3 backends)")
    parser.add_argument("--reserved", type=int, default=0, help="slots reserved for realtime (the seed reserves none)")
    parser.add_argument("--jitter-ms", type=int, default=0, help="backend latency is uniform in latency ± jitter")
    args = parser.parse_args()
    with redis_url(args.redis_url) as url, postgres_url(args.database_url) as dsn:
        print("idle latency ...", flush=True)
        idle = await idle_latency(url, dsn, args.idle_n)
        print(json.dumps(idle, indent=2), flush=True)
        print(f"overload: 2x capacity for {args.seconds:g}s ...", flush=True)
        load = await overload(url, args.seconds, args.latency_ms, args.slots, args.reserved, args.jitter_ms)
        print(json.dumps(load, indent=2), flush=True)
    doc = {"benchmark": "pipeline", "idle": idle, "overload": load, "machine": machine()}
    write_result("pipeline", doc)


if __name__ == "__main__":
    asyncio.run(main())
