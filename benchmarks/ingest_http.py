"""HTTP ingest: single-message POST /api/v1/messages against a bare Starlette endpoint doing one XADD.

Both run under the same uvicorn settings (one process, its default event loop and HTTP parser) on the
same Redis, measured in the same run with wrk (Debian's ``wrk``); then 1000-message batches through
POST /api/v1/messages/batch.

    .venv/bin/python -m benchmarks.ingest_http [--redis-url URL] [--seconds 10] [--connections 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks._procs import ROOT, free_port, redis_url, stages, wait_up, write_result

BODY = {"level": "normal", "request": {"model": "m", "messages": [{"role": "user", "content": "x" * 200}]}}

BARE_APP = """
import sys, uvicorn, redis.asyncio as aioredis
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route
r = aioredis.Redis.from_url(sys.argv[1], max_connections=200)
async def post(request):
    await r.xadd("{bare}:q", {b"m": await request.body()})
    return Response(b'{"status":"queued"}', status_code=202, media_type="application/json")
app = Starlette(routes=[Route("/api/v1/messages", post, methods=["POST"])])
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning", access_log=False)
"""


def wrk(url: str, seconds: float, connections: int) -> dict[str, float]:
    script = Path(tempfile.mkstemp(suffix=".lua")[1])
    script.write_text(
        'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
        f"wrk.body = {json.dumps(json.dumps(BODY))}\n"
    )
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{int(seconds)}s", "--latency", "-s", str(script), url],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    return {
        "rps": rps,
        "non_2xx": float(non2xx.group(1)) if non2xx else 0.0,
        "p99_ms": float(p99.group(1)) * scale[p99.group(2)] if p99 else float("nan"),
    }


async def batches(base: str, n_batches: int, size: int) -> float:
    items = [BODY] * size
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        started = time.perf_counter()
        accepted = 0
        for _ in range(n_batches):
            response = await client.post("/api/v1/messages/batch", json=items)
            accepted += sum(1 for r in response.json() if r["status_code"] == 202)
        return accepted / (time.perf_counter() - started)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis-url")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is not installed: apt-get install wrk")
    results: dict[str, list[dict[str, float]]] = {"bare": [], "llmq": []}
    with redis_url(args.redis_url) as url:
        ingest_port, bare_port = free_port(), free_port()
        env = {
            "LLMQ_REDIS_URL": url,
            "LLMQ_KEY_PREFIX": "{benchingest}",
            "LLMQ_SERVER__PORT": str(ingest_port),
            "LLMQ_SERVER__HOST": "127.0.0.1",
            "LLMQ_LOGGING__LEVEL": "warning",
            "LLMQ_QUEUE__DEFAULT_MAX_SIZE": "100000000",
        }
        bare = subprocess.Popen([sys.executable, "-c", BARE_APP, url, str(bare_port)], cwd=ROOT)  # noqa: ASYNC220
        try:
            with stages(env, ["run", "ingest"]):
                wait_up(f"http://127.0.0.1:{bare_port}/", deadline=time.monotonic() + 30, proc=bare)
                for i in range(args.rounds):
                    for name, port in (("bare", bare_port), ("llmq", ingest_port)):
                        r = wrk(f"http://127.0.0.1:{port}/api/v1/messages", args.seconds, args.connections)
                        results[name].append(r)
                        print(f"round {i + 1} {name:<5} {r['rps']:>9,.0f} req/s  p99 {r['p99_ms']:.1f} ms  "
                              f"non-2xx {r['non_2xx']:.0f}", flush=True)  # fmt: skip
                batch_rate = await batches(f"http://127.0.0.1:{ingest_port}", 20, 1000)
                print(f"batch ingest: {batch_rate:,.0f} msgs/s (1000-message batches)", flush=True)
        finally:
            bare.terminate()
            bare.wait()
    best = {k: max(r["rps"] for r in v) for k, v in results.items()}
    ratio = best["llmq"] / best["bare"]
    print(f"best: bare {best['bare']:,.0f} req/s, llmq {best['llmq']:,.0f} req/s, ratio {ratio:.2f}")
    doc = {"benchmark": "ingest_http", "results": results, "best": best, "ratio": ratio, "batch_msgs_per_s": batch_rate}
    write_result("ingest_http", doc)


if __name__ == "__main__":
    asyncio.run(main())
