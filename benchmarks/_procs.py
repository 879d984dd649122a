"""Helpers for the benchmarks: an embedded Redis/Postgres when none is given, and stage processes."""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import redis.asyncio as aioredis

from llmq.cli.embedded import EmbeddedPostgres, EmbeddedRedis

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def redis_url(given: str | None) -> Iterator[str]:
    if given:
        yield given
        return
    with tempfile.TemporaryDirectory(prefix="llmq-bench-valkey-", ignore_cleanup_errors=True) as data:
        server = EmbeddedRedis(Path(data))
        try:
            yield server.start()
        finally:
            server.stop()


@contextmanager
def postgres_url(given: str | None) -> Iterator[str]:
    if given:
        yield given
        return
    with tempfile.TemporaryDirectory(prefix="llmq-bench-pg-", ignore_cleanup_errors=True) as data:
        server = EmbeddedPostgres(Path(data) / "pg")
        try:
            yield server.start()
        finally:
            server.stop()


def run_env(url: str, prefix: str, api_port: int) -> dict[str, str]:
    """The environment of one run's stage processes: its Redis and key prefix, warnings only in their logs,
    and the ingest on 127.0.0.1:``api_port``."""
    return {
        "LLMQ_REDIS_URL": url,
        "LLMQ_KEY_PREFIX": prefix,
        "LLMQ_LOGGING__LEVEL": "warning",
        "LLMQ_SERVER__HOST": "127.0.0.1",
        "LLMQ_SERVER__PORT": str(api_port),
    }


@contextmanager
def stages(env: dict[str, str], *argvs: list[str]) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Start ``llmq-stage <argv>`` processes and wait until each answers on its port (``--port 0`` is
    given a free one); SIGTERM them on exit. On 2 busy cores a start takes seconds: a fixed pause made
    the first messages of a run wait for stages still importing, and counted that wait as the queue's."""
    full_env = {**{k: v for k, v in os.environ.items() if not k.startswith("LLMQ_")}, **env}
    log = open(tempfile.mkstemp(prefix="llmq-bench-", suffix=".log")[1], "wb")  # noqa: SIM115
    procs, health = [], []
    for given in argvs:
        argv = list(given)
        if "--port" in argv:
            at = argv.index("--port") + 1
            argv[at] = argv[at] if argv[at] != "0" else str(free_port())
            health.append(f"http://127.0.0.1:{argv[at]}/health")
        else:  # the ingest stage
            health.append(f"http://127.0.0.1:{env['LLMQ_SERVER__PORT']}/api/v1/health")
        procs.append(
            subprocess.Popen([sys.executable, "-m", "llmq.cli", *argv], env=full_env, cwd=ROOT, stdout=log, stderr=log)
        )
    try:
        deadline = time.monotonic() + 60
        for p, url in zip(procs, health, strict=True):
            wait_up(url, deadline=deadline, proc=p, log=log.name)
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        log.close()
        if not os.path.getsize(log.name):  # kept only when a stage had something to say (warnings up)
            os.unlink(log.name)


async def poll_until(check: Callable[[], Awaitable[bool]], *, timeout_s: float, what: str) -> None:
    """Await ``check()`` every 20 ms until it is true; RuntimeError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout_s:g}s waiting for {what}")
        await asyncio.sleep(0.02)


async def drop_prefix(redis: aioredis.Redis, prefix: str) -> None:
    """Delete every key of one run's prefix, then close the client."""
    found = [k async for k in redis.scan_iter(match=f"{prefix}*", count=1000)]
    for i in range(0, len(found), 1000):
        await redis.delete(*found[i : i + 1000])
    await redis.aclose()


def wait_up(url: str, *, deadline: float, proc: subprocess.Popen[bytes] | None = None, log: str = "") -> None:
    """Until ``url`` answers at all (a server that just started); RuntimeError once ``deadline``
    (monotonic) passes, or at once when ``proc``, the server's process, has exited."""
    with httpx.Client(timeout=5) as client:
        while True:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}; log: {log}")
            try:
                client.get(url)
                return
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{url} did not answer in time; log: {log}") from None
                time.sleep(0.05)


def machine() -> dict[str, Any]:
    """What the figures were measured on: cores, Python and the versions of the parts that matter."""
    versions = {}
    for package in ("redis", "hiredis", "msgspec", "starlette", "uvicorn", "psycopg", "httpx"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return {
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "packages": versions,
    }


def write_result(name: str, doc: dict[str, Any]) -> Path:
    """Save one run's figures as benchmarks/out/<name>-<unix time>.json."""
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    path = out / f"{name}-{int(time.time())}.json"
    path.write_text(json.dumps({**doc, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=2))
    return path


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


FIXED_ANSWER = (
    '{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,'
    '"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],'
    '"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}'
)
"""What the nginx backend answers to every request: a chat completion."""


@contextmanager
def nginx_backend(workers: int = 1) -> Iterator[str]:
    """nginx answering every request with ``FIXED_ANSWER`` (``workers`` processes, no logs): a backend that
    costs almost nothing, so a throughput figure measures the caller and not the backend. Yields its base URL
    (``…/v1``). Needs Debian's ``nginx-light``."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="llmq-bench-nginx-") as folder:
        conf = Path(folder) / "nginx.conf"
        temp = " ".join(
            f"{kind}_temp_path {folder}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        conf.write_text(
            f"worker_processes {workers}; daemon off; pid {folder}/nginx.pid; error_log {folder}/error.log warn;\n"
            "events { worker_connections 8192; }\n"
            f"http {{ access_log off; keepalive_requests 10000000; {temp}\n"
            f"  server {{ listen 127.0.0.1:{port} backlog=4096; location / {{\n"
            f"    default_type application/json; return 200 '{FIXED_ANSWER}'; }} }} }}\n"
        )
        proc = subprocess.Popen(
            ["nginx", "-c", str(conf), "-p", folder], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            wait_up(f"http://127.0.0.1:{port}/", deadline=time.monotonic() + 10, proc=proc)
            yield f"http://127.0.0.1:{port}/v1"
        finally:
            proc.send_signal(signal.SIGQUIT)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
