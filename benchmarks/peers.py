"""Dramatiq and Celery (Redis broker) on the same Redis: enqueue N jobs (``benchmarks.peer_jobs``) with each
library's own API while its workers drain them; jobs per second from the first send to the last job done."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import redis.asyncio as aioredis

from benchmarks._procs import ROOT, poll_until

CELERY = ["-m", "celery", "-A", "benchmarks.peer_jobs", "worker", "--without-gossip", "--without-mingle",
          "--without-heartbeat", "--loglevel", "WARNING"]  # fmt: skip
WORKERS = {
    # Per job: the worker processes' command lines. A no-op job uses processes (as many as cores); a job
    # that waits on HTTP and PostgreSQL uses 2 processes x 8 threads, as each library documents for I/O.
    ("dramatiq", "noop"): [["-m", "dramatiq", "benchmarks.peer_jobs", "--processes", "2", "--threads", "8"]],
    ("dramatiq", "call"): [["-m", "dramatiq", "benchmarks.peer_jobs", "--processes", "2", "--threads", "8"]],
    ("celery", "noop"): [[*CELERY, "--concurrency", "2", "--pool", "prefork"]],
    ("celery", "call"): [[*CELERY, "--concurrency", "8", "--pool", "threads", "-n", f"w{i}@%h"] for i in (1, 2)],
}


@contextmanager
def workers(kind: str, job: str, env: dict[str, str]) -> Iterator[None]:
    """The library's own worker commands, each in its own process group: SIGTERM to its main process, then
    SIGKILL to the whole group if it has not stopped within 30 s."""
    procs = []
    with tempfile.NamedTemporaryFile(prefix=f"llmq-bench-{kind}-", suffix=".log", delete=False) as log:
        for argv in WORKERS[kind, job]:
            argv = [sys.executable, *argv, *(["--queues", env["PEER_QUEUE"]] if kind == "celery" else [])]
            procs.append(subprocess.Popen(argv, env=env, cwd=ROOT, stdout=log, stderr=log, start_new_session=True))
        try:
            yield
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)  # the main process stops its own worker processes
            for proc in procs:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
    for proc in procs:
        if proc.returncode not in (0, -signal.SIGTERM):
            print(f"  {kind} workers exited with {proc.returncode}; log: {log.name}", flush=True)


async def peer(kind: str, url: str, n: int, job: str = "noop", extra: dict[str, str] | None = None) -> dict[str, Any]:
    """``n`` jobs (``benchmarks.peer_jobs``: ``noop`` or ``call``, whose settings ``extra`` gives) through
    ``kind``'s workers: jobs per second from the first send to the last job done."""
    tag = uuid.uuid4().hex[:8]
    counter = f"peer:{tag}:done"
    env = {**os.environ, "PEER_KIND": kind, "PEER_REDIS_URL": url, "PEER_COUNTER": counter, "PEER_QUEUE": f"p{tag}"}
    env |= extra or {}
    r = aioredis.Redis.from_url(url)

    def done(count: int) -> Any:
        async def check() -> bool:
            return int(await r.get(counter) or 0) >= count

        return check

    try:
        with workers(kind, job, env):
            await _enqueue(env, job, 1)  # warm-up: the workers are up once it is done
            await poll_until(done(1), timeout_s=60, what=f"{kind} workers to start")
            await r.delete(counter)
            first_sent, last_sent = await _enqueue(env, job, n)
            await poll_until(done(n), timeout_s=600, what=f"{kind} to finish {n} jobs")
            finished = time.time()
    finally:
        await r.delete(counter)
        await r.aclose()
    return {"n": n, "jobs_per_s": n / (finished - first_sent), "enqueue_per_s": n / (last_sent - first_sent)}


async def _enqueue(env: dict[str, str], job: str, n: int) -> tuple[float, float]:
    """Runs ``python -m benchmarks.peer_jobs JOB N``; the Unix times of its first and last send."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "benchmarks.peer_jobs", job, str(n), env=env, cwd=ROOT, stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"enqueueing {n} jobs failed with exit code {proc.returncode}")
    first, last = out.split()
    return float(first), float(last)
