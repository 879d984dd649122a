"""The HTTP client for backend calls, chosen by measurement: requests per second on one process against a
backend that costs almost nothing (nginx answering a fixed completion), at 1, 8, 64 and 256 requests in
flight, for each candidate in the same run.

    .venv/bin/python -m benchmarks.http_clients [--seconds 3]

Candidates: httpx with one client; httpx in shards of four connections (llmq's pool until issue 18, a
workaround for httpcore's pool, encode/httpx#3215); aiohttp with one session. Prints a table and writes
JSON to benchmarks/out/.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import httpx

from benchmarks._procs import machine, nginx_backend, write_result

BODY = b'{"model":"m","messages":[{"role":"user","content":"hello"}],"max_tokens":16}'
HEADERS = {"content-type": "application/json"}
IN_FLIGHT = (1, 8, 64, 256)

Post = Callable[[], Awaitable[None]]


async def rate(post: Post, in_flight: int, seconds: float) -> float:
    """Requests per second with ``in_flight`` callers, each posting again as soon as its answer is read."""
    stop = time.perf_counter() + seconds
    done = 0

    async def caller() -> None:
        nonlocal done
        while time.perf_counter() < stop:
            await post()
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(in_flight)))
    return done / (time.perf_counter() - started)


async def httpx_single(url: str, in_flight: int, seconds: float) -> float:
    limits = httpx.Limits(max_connections=in_flight, max_keepalive_connections=in_flight)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:

        async def post() -> None:
            (await client.post(url, content=BODY, headers=HEADERS)).raise_for_status()

        return await rate(post, in_flight, seconds)


async def httpx_sharded(url: str, in_flight: int, seconds: float) -> float:
    per = 4
    limits = httpx.Limits(max_connections=per, max_keepalive_connections=per)
    clients = [httpx.AsyncClient(limits=limits, timeout=30) for _ in range(max(1, -(-in_flight // per)))]
    running = [0] * len(clients)

    async def post() -> None:
        i = min(range(len(running)), key=running.__getitem__)
        running[i] += 1
        try:
            (await clients[i].post(url, content=BODY, headers=HEADERS)).raise_for_status()
        finally:
            running[i] -= 1

    try:
        return await rate(post, in_flight, seconds)
    finally:
        for c in clients:
            await c.aclose()


async def aiohttp_session(url: str, in_flight: int, seconds: float) -> float:
    connector = aiohttp.TCPConnector(limit=in_flight)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def post() -> None:
            async with session.post(url, data=BODY, headers=HEADERS) as response:
                response.raise_for_status()
                await response.read()

        return await rate(post, in_flight, seconds)


CANDIDATES = {"httpx": httpx_single, "httpx, shards of 4": httpx_sharded, "aiohttp": aiohttp_session}


async def run(seconds: float) -> dict[str, Any]:
    figures: dict[str, dict[int, float]] = {name: {} for name in CANDIDATES}
    with nginx_backend() as base:
        url = base + "/chat/completions"
        for in_flight in IN_FLIGHT:
            for name, candidate in CANDIDATES.items():
                await candidate(url, in_flight, 0.3)  # connections opened, code warm
                figures[name][in_flight] = await candidate(url, in_flight, seconds)
                print(f"  {name:<20} {in_flight:>4} in flight: {figures[name][in_flight]:>8,.0f} req/s", flush=True)
    return {"seconds": seconds, "req_per_s": figures}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="how long each figure is measured")
    args = parser.parse_args()
    doc = {
        "machine": machine() | {"aiohttp": aiohttp.__version__, "httpx": httpx.__version__},
        **await run(args.seconds),
    }
    print(f"wrote {write_result('http_clients', doc)}")


if __name__ == "__main__":
    asyncio.run(main())
