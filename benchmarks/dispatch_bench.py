"""The dispatch consumer group: how throughput scales with dispatch processes, and how long the queue
takes to finish every message after a dispatcher holding in-flight work is SIGKILLed.

1. Scaling: 3 mock backends with 100 ms calls and room for 64 calls each; each dispatch process holds
   at most 16 calls (queue.worker.max_concurrent), so one process can do at most 160 msgs/s. Messages
   completed per second over a fixed window with 1, 2 and 4 dispatch processes.
2. Recovery: 2 dispatch processes, calls of 2 s, claim_timeout 5 s; once both hold calls, one is
   SIGKILLed; seconds from the kill until every message is completed, and duplicate backend calls.

    .venv/bin/python -m benchmarks.dispatch_bench [--redis-url URL] [--window 6]

Prints figures, writes JSON to benchmarks/out/ and the scaling plot to benchmarks/out/scaling.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from typing import Any

import httpx
import redis.asyncio as aioredis

from benchmarks._procs import drop_prefix, free_port, machine, redis_url, stages, write_result
from benchmarks.plots import plot_scaling
from llmq.pipeline.config import load_config
from llmq.pipeline.keys import Keys
from llmq.pipeline.models import encode, new_id
from llmq.pipeline.submit import Submission, Submitter, new_message

CHAT = {"model": "m", "messages": [{"role": "user", "content": "x" * 200}], "max_tokens": 16}
PER_PROCESS = 16
LATENCY_MS = 100


def _env(url: str, prefix: str, backends: list[int], slots: int, extra: dict[str, str]) -> dict[str, str]:
    listed = ", ".join(
        f'{{name: b{i}, url: "http://127.0.0.1:{p}/v1", max_concurrent: {slots}}}' for i, p in enumerate(backends)
    )
    return {
        "LLMQ_REDIS_URL": url,
        "LLMQ_KEY_PREFIX": prefix,
        "LLMQ_LOGGING__LEVEL": "warning",
        "LLMQ_BACKENDS": f"[{listed}]",
        "LLMQ_QUEUE__DEFAULT_MAX_SIZE": "100000",
        "LLMQ_QUEUE__LEVELS": "[{name: normal, priority: 1, max_wait_time: 30s, max_concurrent: 1000}]",
        **extra,
    }


async def _submit(url: str, env: dict[str, str], n: int) -> list[str]:
    redis = aioredis.Redis.from_url(url)
    keys = Keys(env["LLMQ_KEY_PREFIX"])
    submitter = Submitter(load_config(None, env=env), redis=redis, keys=keys)
    messages = [new_message(message_id=new_id(), level="normal", request=CHAT) for _ in range(n)]
    for i in range(0, n, 1000):
        await submitter.submit_many([Submission(m, encode(m)) for m in messages[i : i + 1000]])
    await redis.aclose()
    return [m.id for m in messages]


async def _finished_at(url: str, prefix: str, ids: list[str]) -> list[float]:
    redis = aioredis.Redis.from_url(url)
    keys = Keys(prefix)
    pipe = redis.pipeline(transaction=False)
    for mid in ids:
        pipe.hmget(keys.msg(mid), "status", "finished_at")
    done = [float(fin) for status, fin in await pipe.execute() if status == b"completed" and fin]
    await drop_prefix(redis, prefix)
    return done


async def scaling(url: str, processes: int, window_s: float) -> dict[str, Any]:
    prefix = "{scale" + uuid.uuid4().hex[:6] + "}"
    ports = [free_port() for _ in range(3)]
    env = _env(url, prefix, ports, 64, {"LLMQ_QUEUE__WORKER__MAX_CONCURRENT": str(PER_PROCESS)})
    ids = await _submit(url, env, int(processes * PER_PROCESS * 1000 / LATENCY_MS * (window_s + 3)))
    argvs = [["run", "mock-backend", "--port", str(p), "--latency-ms", str(LATENCY_MS)] for p in ports]
    argvs += [["run", "schedule", "--port", "0"]] + [["run", "dispatch", "--port", "0"]] * processes
    with stages(env, *argvs):
        start = time.time() + 1.0  # every dispatcher has read its first batch by then
        await asyncio.sleep(1.0 + window_s)
    finished = await _finished_at(url, prefix, ids)
    completed = sum(start <= t < start + window_s for t in finished)
    bound = processes * PER_PROCESS * 1000 / LATENCY_MS
    return {"processes": processes, "msgs_per_s": completed / window_s, "bound_msgs_per_s": bound}


async def recovery(url: str, n: int = 100) -> dict[str, Any]:
    prefix = "{recover" + uuid.uuid4().hex[:6] + "}"
    mock, ops = free_port(), [free_port(), free_port()]
    claim_timeout_s = 5
    env = _env(
        url,
        prefix,
        [mock],
        200,
        {"LLMQ_QUEUE__WORKER__CLAIM_TIMEOUT": f"{claim_timeout_s}s", "LLMQ_QUEUE__WORKER__MAX_CONCURRENT": "50"},
    )
    ids = await _submit(url, env, n)
    argvs = [["run", "mock-backend", "--port", str(mock), "--latency-ms", "2000"], ["run", "schedule", "--port", "0"]]
    argvs += [["run", "dispatch", "--port", str(port), "--consumer", f"d{i}"] for i, port in enumerate(ops)]
    redis = aioredis.Redis.from_url(url)
    keys = Keys(prefix)
    with stages(env, *argvs) as procs:
        async with httpx.AsyncClient(timeout=5) as http:
            in_hand = [0, 0]
            while min(in_hand) == 0:
                in_hand = [(await http.get(f"http://127.0.0.1:{p}/health")).json()["in_hand"] for p in ops]
                await asyncio.sleep(0.05)
            procs[2].kill()
            killed = time.monotonic()
            while True:
                pipe = redis.pipeline(transaction=False)
                for mid in ids:
                    pipe.hget(keys.msg(mid), "status")
                if all(s == b"completed" for s in await pipe.execute()):
                    break
                await asyncio.sleep(0.05)
            recovered_s = time.monotonic() - killed
            stats = (await http.get(f"http://127.0.0.1:{mock}/stats")).json()
    await drop_prefix(redis, prefix)
    return {
        "messages": n,
        "in_flight_on_the_killed_dispatcher": in_hand[0],
        "claim_timeout_s": claim_timeout_s,
        "call_latency_s": 2.0,
        "seconds_until_all_completed": recovered_s,
        "duplicate_backend_calls": stats["duplicates"],
    }


async def run(url: str, window_s: float) -> dict[str, Any]:
    results = []
    for processes in (1, 2, 4):
        print(f"dispatch scaling: {processes} process(es), {window_s:g}s window ...", flush=True)
        result = await scaling(url, processes, window_s)
        print(f"  {result['msgs_per_s']:,.0f} msgs/s (bound {result['bound_msgs_per_s']:,.0f})", flush=True)
        results.append(result)
    print("recovery: SIGKILL a dispatcher holding calls ...", flush=True)
    recovered = await recovery(url)
    print(f"  every message completed {recovered['seconds_until_all_completed']:.1f}s after the kill", flush=True)
    plot_scaling(results)
    return {"scaling": results, "recovery": recovered}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url")
    parser.add_argument("--window", type=float, default=6.0, help="seconds of measurement per process count")
    args = parser.parse_args()
    with redis_url(args.redis_url) as url:
        doc = {"benchmark": "dispatch", **await run(url, args.window), "machine": machine()}
    print(json.dumps(doc, indent=2))
    write_result("dispatch", doc)


if __name__ == "__main__":
    asyncio.run(main())
