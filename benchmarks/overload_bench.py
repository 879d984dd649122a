"""Priority under overload, beside Celery doing the same job: how long a realtime message waits while a
backlog of low ones saturates the backend.

The workload: one backend of 8 slots answering in a fixed 100 ms (the mock, a process), 2,000 low messages
queued first, then a realtime message every 100 ms for ``--seconds``. The physical limit of a realtime
message's wait, with no slot kept for it, is the time until the next slot frees: at most 100 ms / 8 = 12.5
ms with the calls' ends spread evenly. Goodput: calls completed per second while the backlog lasted,
against the backend's 80 per second.

- **llmq**, ingest, schedule, dispatch and retry as processes, realtime and low levels: as configured by
  default (the stagger on, no slot reserved), with ``reserved: 1`` for realtime, and, with a backend that
  schedules by priority (``priority: vllm``, the mock's priority mode), with realtime allowed one call
  over the backend's slots. The wait is the status hash's ``scheduled_at - enqueued_at``.
- **Celery**, with the Redis priority setup its documentation gives (``benchmarks/celery_priority.py``:
  ``queue_order_strategy: priority``, ``priority_steps`` 0-9, prefetch 1, acks_late, one worker of 8
  threads; realtime at priority 0, low at 9), the task POSTing the same request to the same backend. The
  wait is from ``apply_async`` to the task's start.

    .venv/bin/python -m benchmarks.overload_bench [--redis-url URL] [--seconds 20]

Prints figures and writes JSON to benchmarks/out/.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any

import httpx
import redis
import redis.asyncio as aioredis

from benchmarks._procs import ROOT, drop_prefix, free_port, machine, pct, redis_url, run_env, stages, write_result
from llmq.pipeline.keys import Keys

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16}
SLOTS = 8
LATENCY_MS = 100
BACKLOG = 2000


def summary(name: str, realtime: list[float], done_times: list[float], window: tuple[float, float]) -> dict[str, Any]:
    """Waits in ms, and goodput over ``window`` (while the backlog lasted)."""
    start, end = window
    done = sum(start <= t <= end for t in done_times)
    goodput = done / ((end - start) * SLOTS / (LATENCY_MS / 1000)) if end > start else float("nan")
    doc = {
        "variant": name,
        "realtime": len(realtime),
        "wait_ms": {"p50": pct(realtime, 0.5) * 1000, "p99": pct(realtime, 0.99) * 1000, "max": max(realtime) * 1000},
        "goodput": goodput,
    }
    w = doc["wait_ms"]
    print(
        f"  {name:<34} realtime wait p50 {w['p50']:.1f} ms, p99 {w['p99']:.1f} ms, max {w['max']:.1f} ms "
        f"({len(realtime)} messages); goodput {goodput:.3f}",
        flush=True,
    )
    return doc


async def llmq_run(url: str, name: str, seconds: float, reserved: int, priority: bool) -> dict[str, Any]:
    prefix = "{ovl" + uuid.uuid4().hex[:6] + "}"
    api, mock = free_port(), free_port()
    extra = ", priority: vllm, overcommit: 1" if priority else ""
    env = run_env(url, prefix, api) | {
        "LLMQ_QUEUE__DEFAULT_MAX_SIZE": str(BACKLOG + 1000),
        "LLMQ_QUEUE__LEVELS": (
            f"[{{name: realtime, priority: 1, max_wait_time: 100ms, max_concurrent: {SLOTS}, reserved: {reserved}}},"
            f" {{name: low, priority: 4, max_wait_time: 600s, max_concurrent: {SLOTS}}}]"
        ),
        "LLMQ_BACKENDS": f'[{{name: mock, url: "http://127.0.0.1:{mock}/v1", max_concurrent: {SLOTS}{extra}}}]',
    }
    argvs = [["run", "mock-backend", "--port", str(mock)], ["run", "ingest"]]
    argvs += [["run", s, "--port", "0"] for s in ("schedule", "dispatch", "retry")]
    keys = Keys(prefix)
    with stages(env, *argvs):
        async with httpx.AsyncClient(timeout=60) as http:
            settings: dict[str, Any] = {"latency_ms": LATENCY_MS}
            if priority:
                settings |= {"engine_slots": SLOTS, "engine_policy": "priority"}
            (await http.post(f"http://127.0.0.1:{mock}/admin/config", json=settings)).raise_for_status()
            low = [{"level": "low", "request": CHAT}] * 1000
            low_ids: list[str] = []
            for _ in range(BACKLOG // 1000):
                reply = await http.post(f"http://127.0.0.1:{api}/api/v1/messages/batch", json=low)
                reply.raise_for_status()
                low_ids += [m["id"] for m in reply.json()]
            await asyncio.sleep(1.0)  # the backend full of low calls
            started = time.time()
            realtime_ids = []
            while time.time() - started < seconds:
                body = {"level": "realtime", "request": CHAT}
                reply = await http.post(f"http://127.0.0.1:{api}/api/v1/messages", json=body)
                reply.raise_for_status()
                realtime_ids.append(reply.json()["id"])
                await asyncio.sleep(0.1)
            ended = time.time()
            await asyncio.sleep(0.5)
            r = aioredis.Redis.from_url(url)
            pipe = r.pipeline(transaction=False)
            for mid in realtime_ids + low_ids:
                pipe.hmget(keys.msg(mid), "enqueued_at", "scheduled_at", "finished_at")
            rows = await pipe.execute()
            await r.aclose()
    await drop_prefix(aioredis.Redis.from_url(url), prefix)
    waits = [float(s) - float(e) for e, s, _ in rows[: len(realtime_ids)] if s is not None]
    finished = [float(f) for _, _, f in rows if f is not None]
    return summary(name, waits, finished, (started, ended))


def celery_run(url: str, seconds: float) -> dict[str, Any]:
    """Synchronous, as Celery's client is: run in a thread by ``main``."""
    queue, waits_key = "ovl" + uuid.uuid4().hex[:6], "ovl-waits-" + uuid.uuid4().hex[:6]
    mock = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LLMQ_")},
        "PEER_REDIS_URL": url,
        "PEER_QUEUE": queue,
        "PEER_BACKEND_URL": f"http://127.0.0.1:{mock}/v1",
        "PEER_WAITS": waits_key,
    }
    worker = [sys.executable, "-m", "celery", "-A", "benchmarks.celery_priority", "worker", "--pool", "threads"]
    worker += ["--concurrency", str(SLOTS), "--queues", queue, "--without-gossip", "--without-mingle"]
    worker += ["--without-heartbeat", "--loglevel", "WARNING"]
    r = redis.Redis.from_url(url)
    with stages(run_env(url, "{unused}", free_port()), ["run", "mock-backend", "--port", str(mock)]):
        httpx.post(f"http://127.0.0.1:{mock}/admin/config", json={"latency_ms": LATENCY_MS}).raise_for_status()
        log = tempfile.NamedTemporaryFile(prefix="llmq-bench-celery-", suffix=".log", delete=False)  # noqa: SIM115
        proc = subprocess.Popen(worker, env=env, cwd=ROOT, stdout=log, stderr=log, start_new_session=True)
        try:
            sender = subprocess.run(
                [sys.executable, "-m", "benchmarks.overload_bench", "--celery-send", str(seconds)],
                env=env,
                cwd=ROOT,
                check=True,
                capture_output=True,
                text=True,
            )
            started, ended, sent = map(float, sender.stdout.split())
            deadline = time.monotonic() + 600
            total = BACKLOG + int(sent)
            while r.llen(waits_key) < total and time.monotonic() < deadline:
                time.sleep(0.2)
            rows = [line.decode().split() for line in r.lrange(waits_key, 0, -1)]
            r.delete(waits_key)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
            log.close()
            r.close()
    waits = [float(w) for level, _, w, _ in rows if level == "realtime"]
    finished = [float(f) for *_, f in rows]
    return summary("Celery (Redis priorities, 8 threads)", waits, finished, (started, ended))


def celery_send(seconds: float) -> None:
    """In its own process (Celery's client is synchronous): the backlog, then realtime every 100 ms; prints
    when the realtime sends began and ended, and how many there were."""
    from benchmarks.celery_priority import call

    for _ in range(BACKLOG):
        call.apply_async(args=("low", time.time()), priority=9)
    time.sleep(1.0)
    started, sent = time.time(), 0
    while time.time() - started < seconds:
        call.apply_async(args=("realtime", time.time()), priority=0)
        sent += 1
        time.sleep(0.1)
    print(started, time.time(), sent)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url")
    parser.add_argument("--seconds", type=float, default=20.0, help="how long realtime messages come")
    parser.add_argument("--celery-send", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.celery_send is not None:
        celery_send(args.celery_send)
        return
    print(f"overload: {BACKLOG} low queued, realtime every 100 ms for {args.seconds:g} s, 8 slots x 100 ms", flush=True)
    results = []
    with redis_url(args.redis_url) as url:
        results.append(await llmq_run(url, "llmq, defaults (stagger, none reserved)", args.seconds, 0, False))
        results.append(await llmq_run(url, "llmq, realtime reserved: 1", args.seconds, 1, False))
        results.append(await llmq_run(url, "llmq, priority backend, overcommit 1", args.seconds, 0, True))
        results.append(await asyncio.to_thread(celery_run, url, args.seconds))
    celery = results[-1]["wait_ms"]["p99"]
    for doc in results[:-1]:
        doc["celery_p99_over_this_p99"] = celery / doc["wait_ms"]["p99"] if doc["wait_ms"]["p99"] else float("inf")
        print(f"  Celery's p99 / {doc['variant']}'s: {doc['celery_p99_over_this_p99']:.1f}x", flush=True)
    write_result("overload_bench", {"machine": machine(), "variants": results})


if __name__ == "__main__":
    asyncio.run(main())
