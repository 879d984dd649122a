"""The ops endpoints every stage process serves on its own port: ``/metrics`` and ``/health``.

Runs uvicorn inside the stage's event loop without taking over signals: in a stage process the CLI
owns SIGTERM/SIGINT/SIGUSR1 (the ingest stage is the exception: there uvicorn serves the API itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from llmq.pipeline.errors import ListenError

GRACEFUL_SHUTDOWN_S = 2
HealthCheck = Callable[[], Awaitable[dict[str, Any]]]
"""Returns a health document with ``status`` "ok", "degraded" or "down"."""


def ops_app(health: HealthCheck, *, metrics_path: str = "/metrics") -> Starlette:
    async def metrics(_: Request) -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    async def health_route(_: Request) -> Response:
        doc = await health()
        return JSONResponse(doc, status_code=503 if doc.get("status") == "down" else 200)

    return Starlette(routes=[Route(metrics_path, metrics), Route("/health", health_route)])


class _QuietServer(uvicorn.Server):
    """uvicorn without its signal handlers: the stage process handles signals itself."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def listen(host: str, port: int) -> socket.socket:
    """A bound, listening TCP socket (IPv6 when ``host`` is an IPv6 address); port 0 picks a free one.
    ListenError naming the address when the port is taken or not permitted."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family)
    except OSError as exc:
        raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    # Accepted sockets inherit it. asyncio sets it on a connection only when the listening socket's proto
    # is IPPROTO_TCP, and create_server leaves it 0: on the stock loop (uvloop sets it anyway) a response
    # written as headers then body waited for the client's delayed ACK, 40 ms per keep-alive request.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


class OpsServer:
    """Serves the ops app on ``host:port``; port 0 picks a free one (``.port`` tells which)."""

    def __init__(self, app: Starlette, *, host: str, port: int, lifespan: bool = False) -> None:
        self.sock = listen(host, port)
        self.port: int = self.sock.getsockname()[1]
        config = uvicorn.Config(
            app,
            log_config=None,
            access_log=False,
            lifespan="on" if lifespan else "off",
            log_level="warning",
            # uvicorn otherwise waits without limit for open connections to close on shutdown.
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        )
        self.server = _QuietServer(config)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self.server.serve(sockets=[self.sock]))

    async def stop(self) -> None:
        self.server.should_exit = True
        if self._task:
            await self._task
        self.sock.close()
