"""Fixtures: real servers only. Redis is LLMQ_TEST_REDIS_URL when set, else an embedded Valkey started
once per session; PostgreSQL is LLMQ_TEST_DATABASE_URL when set, else an embedded PostgreSQL started once
per session. Every test gets its own key prefix and its own database, so tests run in any order."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import redis.asyncio as aioredis
from psycopg.conninfo import make_conninfo

from llmq.cli.embedded import EmbeddedPostgres, EmbeddedRedis
from llmq.pipeline.config import RedisConfig
from llmq.pipeline.keys import Keys
from llmq.pipeline.redis import make_redis


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url = os.environ.get("LLMQ_TEST_REDIS_URL")
    if url:
        yield url
        return
    with tempfile.TemporaryDirectory(prefix="llmq-test-valkey-") as data_dir:
        server = EmbeddedRedis(Path(data_dir))
        try:
            yield server.start()
        finally:
            server.stop()


@pytest.fixture(scope="session")
def postgres_admin_url() -> Iterator[str]:
    url = os.environ.get("LLMQ_TEST_DATABASE_URL")
    if url:
        yield url
        return
    with tempfile.TemporaryDirectory(prefix="llmq-test-pg-") as data_dir:
        server = EmbeddedPostgres(Path(data_dir) / "pg")
        try:
            yield server.start()
        finally:
            server.stop()


@pytest.fixture
async def database_url(postgres_admin_url: str) -> AsyncIterator[str]:
    """A database of this test alone."""
    name = "llmq_t_" + uuid.uuid4().hex[:12]
    async with await psycopg.AsyncConnection.connect(postgres_admin_url, autocommit=True) as conn:
        await conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_conninfo(postgres_admin_url, dbname=name)
    finally:
        async with await psycopg.AsyncConnection.connect(postgres_admin_url, autocommit=True) as conn:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def prefix() -> str:
    """A key prefix of this test alone (a Cluster hash tag, like the production default)."""
    return "{t" + uuid.uuid4().hex[:12] + "}"


@pytest.fixture
def keys(prefix: str) -> Keys:
    return Keys(prefix)


@pytest.fixture
async def redis(redis_url: str, prefix: str) -> AsyncIterator[aioredis.Redis]:
    client = make_redis(RedisConfig(url=redis_url), pool_size=200)
    try:
        yield client
    finally:
        batch: list[bytes] = []
        async for key in client.scan_iter(match=f"{prefix}*", count=500):
            batch.append(key)
        if batch:
            await client.delete(*batch)
        await client.aclose()


@pytest.fixture
def stage_env(redis_url: str, prefix: str) -> dict[str, str]:
    """Environment for a stage process of this test: its Redis, its prefix, fast timings, text logs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMQ_") and k != "CONFIG_PATH"}
    env.update(
        {
            "LLMQ_REDIS_URL": redis_url,
            "LLMQ_KEY_PREFIX": prefix,
            "LLMQ_QUEUE__WORKER__PROCESS_INTERVAL": "100ms",
            "LLMQ_QUEUE__WORKER__CLAIM_TIMEOUT": "1s",
            "LLMQ_QUEUE__WORKER__SHUTDOWN_GRACE": "10s",
            "LLMQ_SCHEDULER__TIMEOUT": "10s",  # within the grace: no warning at start
            "LLMQ_LOGGING__FORMAT": "json",
        }
    )
    return env


_given_ports: set[int] = set()
NEXT_PORTS = 4
"""A stage given a base ops port takes the next ones (``llmq-stage up``): never hand those out either."""


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_PORTS = range(10_000, max(10_001, _ephemeral_low() - NEXT_PORTS))
"""Ports below the kernel's ephemeral range: no client connection of the run takes one as its own local
port between the moment a test picks it and the moment a server binds it (which made a stage exit on a
taken port at random, under the full suite's hundreds of connections)."""


def free_port(span: int = 1) -> int:
    """A port free now, below the ephemeral range, that this run has not handed out before (nor one of the
    ``NEXT_PORTS`` after one); with ``span``, the ``span - 1`` ports after it are free too (a base port
    whose stages take the next)."""
    while True:
        port = random.choice(_PORTS)
        if any(port - k in _given_ports or port + k in _given_ports for k in range(NEXT_PORTS + 1)):
            continue
        if all(_bindable(port + k) for k in range(span)):
            _given_ports.add(port)
            return port


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


async def eventually(
    check: Callable[[], Awaitable[bool]], *, within: float = 15.0, interval: float = 0.02, what: str = ""
) -> None:
    """Await ``check()`` until it is true; fail the test after ``within`` seconds."""
    deadline = asyncio.get_running_loop().time() + within
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"timed out after {within}s waiting for {what or check}")
        await asyncio.sleep(interval)
