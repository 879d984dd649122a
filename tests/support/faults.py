"""A TCP proxy that injects faults between a client and a server (Redis, PostgreSQL): the harness that keeps
llmq's writes safe to repeat.

Each client connection gets its own upstream connection; bytes are relayed both ways until a fault ends
both. The faults are the ones a network or a restarting server produces:

- **drop a reply**: the request is forwarded and executed, then the connection is reset before its reply
  reaches the client, which cannot tell whether the server ran it (and redis-py sends it again);
- **reset mid-request**: part of a request reaches the server, then the connection is reset (the server
  runs nothing of an incomplete command, but a pipeline may be cut between commands);
- **stall**: a reply is held back for a while before it is relayed.

Faults fire on requests that contain a given byte string (``arm``: the next one, for deterministic tests)
or at random with a given probability (``chaos``: for end-to-end runs). The proxy counts what it did.

It runs its own event loop in a thread, so a test that blocks (waiting for a process's log line) does not
stall the connections it relays.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

CHUNK = 1 << 16


@dataclass
class Counts:
    connections: int = 0
    dropped_replies: int = 0
    resets: int = 0
    stalls: int = 0


@dataclass
class _Armed:
    kind: str
    """"drop" (the reply), "reset" (mid-request) or "stall"."""
    match: bytes
    times: int
    stall_s: float = 0.0


@dataclass
class _Chaos:
    drop: float = 0.0
    reset: float = 0.0
    stall: float = 0.0
    stall_s: float = 0.05
    match: bytes = b""
    rng: random.Random = field(default_factory=lambda: random.Random(16))


class FaultProxy:
    """``async with FaultProxy(host, port) as proxy``: clients connect to ``proxy.port`` on 127.0.0.1. With a
    host that is a path (a unix socket, as an embedded PostgreSQL has), the proxy relays to that socket."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0
        self.counts = Counts()
        self._armed: list[_Armed] = []
        self._chaos = _Chaos()
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> FaultProxy:
        self._thread.start()
        await asyncio.wrap_future(self._submit(self._open()))
        return self

    async def __aexit__(self, *_: object) -> None:
        await asyncio.wrap_future(self._submit(self._close()))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    def _submit(self, coro: Any) -> Future[Any]:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    async def _open(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._links):
            task.cancel()
        await asyncio.gather(*self._links, return_exceptions=True)
        await self._server.wait_closed()

    def url(self, scheme: str = "redis", path: str = "/0") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{path}"

    def arm(self, kind: str, match: bytes, *, times: int = 1, stall_s: float = 0.5) -> None:
        """Fault the next ``times`` requests containing ``match``: "drop" their reply, "reset" them half-sent,
        or "stall" their reply ``stall_s``."""
        assert kind in ("drop", "reset", "stall")
        with self._lock:
            self._armed.append(_Armed(kind, match, times, stall_s))

    def chaos(
        self, *, drop: float = 0.0, reset: float = 0.0, stall: float = 0.0, stall_s: float = 0.05, match: bytes = b""
    ) -> None:
        """From now on, fault each request (containing ``match``, when given) at random with these
        probabilities; all zero stops it."""
        self._chaos = _Chaos(drop=drop, reset=reset, stall=stall, stall_s=stall_s, match=match, rng=self._chaos.rng)

    def _fault_for(self, request: bytes) -> tuple[str, float] | None:
        with self._lock:
            for armed in self._armed:
                if armed.match in request:
                    armed.times -= 1
                    if armed.times == 0:
                        self._armed.remove(armed)
                    return armed.kind, armed.stall_s
        c = self._chaos
        if c.match and c.match not in request:
            return None
        roll = c.rng.random()
        if roll < c.drop:
            return "drop", 0.0
        if roll < c.drop + c.reset:
            return "reset", 0.0
        if roll < c.drop + c.reset + c.stall:
            return "stall", c.stall_s
        return None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._links.add(task)
        self.counts.connections += 1
        try:
            host, port = self.target
            if host.startswith("/"):
                up_reader, up_writer = await asyncio.open_unix_connection(host)
            else:
                up_reader, up_writer = await asyncio.open_connection(host, port)
        except OSError:
            _reset(writer)
            self._links.discard(task)
            return
        fault: asyncio.Queue[tuple[str, float] | None] = asyncio.Queue()
        try:
            await _first_done(self._requests(reader, up_writer, fault), self._replies(up_reader, writer, fault))
        except asyncio.CancelledError:
            pass  # the proxy is closing: asyncio's server callback would log a cancelled handler as an error
        finally:
            _reset(writer)
            _reset(up_writer)
            self._links.discard(task)

    async def _requests(
        self, reader: asyncio.StreamReader, up: asyncio.StreamWriter, faults: asyncio.Queue[tuple[str, float] | None]
    ) -> None:
        while data := await reader.read(CHUNK):
            fault = self._fault_for(data)
            if fault and fault[0] == "reset":
                # Cut the request: the server gets part of it (a whole pipeline's first commands, or an
                # incomplete command that it never runs), the client an error.
                up.write(data[: max(1, len(data) // 2)])
                await up.drain()
                self.counts.resets += 1
                return
            up.write(data)
            await up.drain()
            if fault:
                faults.put_nowait(fault)

    async def _replies(
        self, up: asyncio.StreamReader, writer: asyncio.StreamWriter, faults: asyncio.Queue[tuple[str, float] | None]
    ) -> None:
        while data := await up.read(CHUNK):
            fault = None if faults.empty() else faults.get_nowait()
            if fault and fault[0] == "drop":
                # The server executed the request and answered; the client never hears it.
                self.counts.dropped_replies += 1
                return
            if fault and fault[0] == "stall":
                self.counts.stalls += 1
                await asyncio.sleep(fault[1])
            writer.write(data)
            await writer.drain()


async def _first_done(*coros: object) -> None:
    tasks = [asyncio.ensure_future(c) for c in coros]  # type: ignore[arg-type]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a reset (SO_LINGER 0), as a dropped connection looks to its peer."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    writer.close()
