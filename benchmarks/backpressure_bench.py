"""A backend that refuses past its capacity: goodput through llmq with ``max_concurrent: auto`` against a
fixed ``max_concurrent`` set right (the hand-tuned ceiling) and set four times too high, in the same run.

The backend is the mock (a separate process) answering each call after a fixed latency and refusing any
call past N in flight with 503, as vLLM with ``--max-num-queued-reqs`` does. Its capacity is N / latency
calls a second; goodput is the rate at which llmq completes messages divided by that. The stages (ingest,
schedule, dispatch, retry) are processes with the default retry policy (backoff from 1 s, 3 retries);
the dispatcher's metrics are sampled every 250 ms for its circuit (``llmq_backend_up``) and its window
(``llmq_backend_concurrency_limit``).

    .venv/bin/python -m benchmarks.backpressure_bench [--redis-url URL] [--n 1200] [--slots 8]

Prints figures and writes JSON to benchmarks/out/.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import time
import uuid
from typing import Any

import httpx
import redis.asyncio as aioredis

from benchmarks._procs import drop_prefix, free_port, machine, redis_url, run_env, stages, write_result
from llmq.pipeline.keys import Keys

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16}
TERMINAL = {b"completed", b"failed", b"expired", b"cancelled", b"dead"}
_UP = re.compile(rb'^llmq_backend_up\{backend="mock"\} (\S+)$', re.M)
_LIMIT = re.compile(rb'^llmq_backend_concurrency_limit\{backend="mock"\} (\S+)$', re.M)


async def sample(http: httpx.AsyncClient, metrics_url: str, trace: list[tuple[float, float, float]]) -> None:
    """Every 250 ms: (seconds, backend up, window) from the dispatcher's metrics."""
    started = time.monotonic()
    while True:
        text = (await http.get(metrics_url)).content
        up, limit = _UP.search(text), _LIMIT.search(text)
        if up and limit:
            trace.append((time.monotonic() - started, float(up[1]), float(limit[1])))
        await asyncio.sleep(0.25)


async def variant(url: str, name: str, backend: str, n: int, slots: int, latency_ms: float) -> dict[str, Any]:
    prefix = "{bp" + uuid.uuid4().hex[:6] + "}"
    api, mock, ops = free_port(), free_port(), free_port()
    env = run_env(url, prefix, api) | {
        "LLMQ_QUEUE__DEFAULT_MAX_SIZE": str(n + 1000),
        "LLMQ_QUEUE__LEVELS": "[{name: normal, priority: 1, max_wait_time: 30s, max_concurrent: 1000}]",
        "LLMQ_BACKENDS": f'[{{name: mock, url: "http://127.0.0.1:{mock}/v1", {backend}}}]',
    }
    argvs = [["run", "mock-backend", "--port", str(mock)], ["run", "ingest"]]
    argvs += [["run", "schedule", "--port", "0"], ["run", "dispatch", "--port", str(ops)]]
    argvs += [["run", "retry", "--port", "0"]]
    keys = Keys(prefix)
    trace: list[tuple[float, float, float]] = []
    with stages(env, *argvs):
        async with httpx.AsyncClient(timeout=60) as http:
            settings = {"latency_ms": latency_ms, "max_concurrent": slots, "busy_status": 503}
            (await http.post(f"http://127.0.0.1:{mock}/admin/config", json=settings)).raise_for_status()
            r = aioredis.Redis.from_url(url)
            sampler = asyncio.create_task(sample(http, f"http://127.0.0.1:{ops}/metrics", trace))
            started = time.perf_counter()
            ids: list[str] = []
            for i in range(0, n, 1000):
                batch = [{"level": "normal", "request": CHAT}] * min(1000, n - i)
                reply = await http.post(f"http://127.0.0.1:{api}/api/v1/messages/batch", json=batch)
                reply.raise_for_status()
                ids += [m["id"] for m in reply.json()]
            statuses: list[bytes] = []
            while True:
                pipe = r.pipeline(transaction=False)
                for mid in ids:
                    pipe.hget(keys.msg(mid), "status")
                statuses = await pipe.execute()
                if all(s in TERMINAL for s in statuses):
                    break
                await asyncio.sleep(0.1)
            elapsed = time.perf_counter() - started
            sampler.cancel()
            stats = (await http.get(f"http://127.0.0.1:{mock}/stats")).json()
            await r.aclose()
    await drop_prefix(aioredis.Redis.from_url(url), prefix)
    completed = statuses.count(b"completed")
    capacity = slots / (latency_ms / 1000)
    ups = [up for _, up, _ in trace]
    limits = [limit for _, _, limit in trace]
    steady = limits[len(limits) // 4 :] or limits
    doc = {
        "variant": name,
        "backend": backend,
        "messages": n,
        "completed": completed,
        "not_completed": {s.decode(): statuses.count(s) for s in set(statuses) if s != b"completed"},
        "seconds": elapsed,
        "msgs_per_s": completed / elapsed,
        "goodput": completed / elapsed / capacity,
        "calls": stats["calls"],
        "refused": stats["refused"],
        "peak_concurrency": stats["peak_concurrency"],
        "circuit_opened": any(up < 1 for up in ups),
        "window_after_first_quarter": {"min": min(steady), "max": max(steady)} if steady else None,
    }
    window = doc["window_after_first_quarter"]
    print(
        f"  {name:<22} {completed}/{n} completed in {elapsed:.1f} s: goodput {doc['goodput']:.3f} of {capacity:.0f}/s; "
        f"{stats['calls']} calls, {stats['refused']} refused; circuit opened: {doc['circuit_opened']}; "
        f"window {window['min']:.0f}-{window['max']:.0f}"
        + (f"; not completed {doc['not_completed']}" if doc["not_completed"] else ""),
        flush=True,
    )
    return doc


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url")
    parser.add_argument("--n", type=int, default=1200, help="messages per variant")
    parser.add_argument("--slots", type=int, default=8, help="calls the backend takes at once (N)")
    parser.add_argument("--latency-ms", type=float, default=100.0)
    args = parser.parse_args()
    n, slots = args.n, args.slots
    variants = [
        ("fixed N (hand-tuned)", f"max_concurrent: {slots}"),
        ("auto from 4N", f"max_concurrent: auto, concurrency: {{min: 1, max: {4 * slots}}}"),
        ("fixed 4N (too high)", f"max_concurrent: {4 * slots}"),
    ]
    print(f"backpressure: {n} messages, backend of {slots} slots at {args.latency_ms:g} ms, 503 past them", flush=True)
    results = []
    with redis_url(args.redis_url) as url:
        for name, backend in variants:
            results.append(await variant(url, name, backend, n, slots, args.latency_ms))
    write_result("backpressure_bench", {"machine": machine(), "slots": slots, "variants": results})


if __name__ == "__main__":
    asyncio.run(main())
