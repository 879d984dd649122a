"""Lua scripts, run by their SHA (EVALSHA) and loaded again when the server answers NOSCRIPT (a restarted
or failed-over Redis has no script cache).

redis-py's ``Script.__call__`` does the same, but first checks ``isinstance(client, Pipeline)``, and
``Pipeline`` derives from a typing Protocol, whose instance check is slow: under load it was a tenth of
the ingest stage's CPU.

A script called by many coroutines at once (a submission per HTTP request, a backend slot per call in
flight) is run through ``Coalesced``: the calls made in one turn of the event loop go to Redis as one
pipeline, so the client's per-command work (taking a pooled connection, writing, waking the caller) is
paid once per turn instead of once per call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from llmq.pipeline.models import Status

Call = tuple[Sequence[Any], Sequence[Any]]
"""The keys and the arguments of one call."""

ENDED = "local ENDED = {" + ", ".join(f"['{s.value}'] = true" for s in Status if s.terminal) + "}\n"
"""Lua: the set of terminal statuses, generated from ``Status`` so a script never spells them itself."""


def script_source(name: str) -> str:
    """The script ``llmq/pipeline/scripts/<name>.lua`` (its header names its KEYS and ARGV), with ``ENDED``
    prepended and each ``--@include <piece>`` line replaced by ``llmq/pipeline/scripts/<piece>.lua``."""
    lines = [
        _read(line.removeprefix(INCLUDE).strip()) if line.startswith(INCLUDE) else line
        for line in _read(name).splitlines()
    ]
    return ENDED + "\n".join(lines) + "\n"


INCLUDE = "--@include "


def _read(name: str) -> str:
    return resources.files("llmq.pipeline.scripts").joinpath(f"{name}.lua").read_text()


class Lua:
    def __init__(self, redis: aioredis.Redis, source: str) -> None:
        self._redis = redis
        self._script = redis.register_script(source)

    async def __call__(self, keys: Sequence[Any], args: Sequence[Any] = ()) -> Any:
        sha = self._script.sha
        try:
            return await self._redis.evalsha(sha, len(keys), *keys, *args)
        except NoScriptError:
            await self._redis.script_load(self._script.script)
            return await self._redis.evalsha(sha, len(keys), *keys, *args)

    async def many(self, calls: Sequence[Call]) -> list[Any]:
        """Every call in one round trip (not atomic together). Each reply is the script's result, or the
        error that call raised: one call failing does not fail the others."""
        replies = await self._pipelined(calls)
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:  # a NOSCRIPT call ran nothing: run it again once the script is loaded
            await self._redis.script_load(self._script.script)
            for i, reply in zip(missing, await self._pipelined([calls[i] for i in missing]), strict=True):
                replies[i] = reply
        return replies

    async def _pipelined(self, calls: Sequence[Call]) -> list[Any]:
        pipe = self._redis.pipeline(transaction=False)
        for keys, args in calls:
            pipe.execute_command("EVALSHA", self._script.sha, len(keys), *keys, *args)
        return list(await pipe.execute(raise_on_error=False))


class Coalesced:
    """A script whose calls made in the same turn of the event loop are sent together (``Lua.many``).

    The first call of a turn starts the task that sends; it runs at the next turn, after every coroutine
    ready in this one has added its call. A lone call waits that one turn, tens of microseconds.
    """

    def __init__(self, lua: Lua) -> None:
        self._lua = lua
        self._waiting: list[tuple[Call, asyncio.Future[Any]]] = []
        self._sending: set[asyncio.Task[None]] = set()

    async def __call__(self, keys: Sequence[Any], args: Sequence[Any] = ()) -> Any:
        future = asyncio.get_running_loop().create_future()
        self._waiting.append(((keys, args), future))
        if len(self._waiting) == 1:
            task = asyncio.create_task(self._send())
            self._sending.add(task)  # the loop keeps only a weak reference to a task
            task.add_done_callback(self._sending.discard)
        return await future

    async def _send(self) -> None:
        waiting, self._waiting = self._waiting, []
        try:
            replies = await self._lua.many([call for call, _ in waiting])
        except asyncio.CancelledError:  # the process is stopping: so are its callers
            for _, future in waiting:
                future.cancel()
            raise
        except Exception as exc:  # Redis unreachable: every caller of the turn gets the error
            replies = [exc] * len(waiting)
        for (_, future), reply in zip(waiting, replies, strict=True):
            if future.done():  # its caller was cancelled meanwhile
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)
