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
import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from llmq.pipeline.keys import Group
from llmq.pipeline.models import FIELD, Status

Call = tuple[Sequence[Any], Sequence[Any]]
"""The keys and the arguments of one call."""

PREAMBLE = (
    "".join(f"local {s.name} = '{s.value}'\n" for s in Status)
    + "local ENDED = {"
    + ", ".join(f"[{s.name}] = true" for s in Status if s.terminal)
    + "}\n"
    + f"local M = '{FIELD.decode()}'\n"
    + "".join(f"local {g.name}_GROUP = '{g.value}'\n" for g in Group)
)
"""Lua prepended to every script: each status word as a constant (``QUEUED`` ... ``DEAD``), ``ENDED`` the set
of terminal ones, ``M`` the stream field that holds a message, and each consumer group (``SCHEDULE_GROUP``
...): generated from ``Status``, ``FIELD`` and ``Group``, so no script spells them itself."""

INCLUDE = "--@include "
_NAME = re.compile(r"(?P<name>[a-z_]+)(?:-(?P<keys>\d+))?\.lua")


@dataclass(frozen=True, slots=True)
class Source:
    name: str
    text: str
    key_count: int | None
    """The number of KEYS every call passes, from the file name (``take_over-2.lua``, as BullMQ names
    its scripts); None when it varies (the header says how)."""


@functools.cache
def _files() -> dict[str, tuple[str, int | None]]:
    found: dict[str, tuple[str, int | None]] = {}
    for entry in resources.files("llmq.pipeline.scripts").iterdir():
        match = _NAME.fullmatch(entry.name)
        if match:
            count = match["keys"]
            found[match["name"]] = (entry.name, int(count) if count else None)
    return found


def script_source(name: str) -> Source:
    """The script ``llmq/pipeline/scripts/<name>[-<key count>].lua`` (its header names its KEYS and ARGV),
    with ``PREAMBLE`` prepended and each ``--@include <piece>`` line replaced by that piece's file."""
    file, key_count = _files()[name]
    lines = [
        _read(_files()[line.removeprefix(INCLUDE).strip()][0]) if line.startswith(INCLUDE) else line
        for line in _read(file).splitlines()
    ]
    return Source(name, PREAMBLE + "\n".join(lines) + "\n", key_count)


def script_names() -> list[str]:
    """Every script and included piece, by name."""
    return sorted(_files())


def _read(file: str) -> str:
    return resources.files("llmq.pipeline.scripts").joinpath(file).read_text()


class Lua:
    """One script, by its name in ``llmq/pipeline/scripts`` (or as a ``Source``), run by its SHA."""

    def __init__(self, redis: aioredis.Redis, script: str | Source) -> None:
        self._redis = redis
        self._source = script if isinstance(script, Source) else script_source(script)
        self._script = redis.register_script(self._source.text)

    def _check(self, keys: Sequence[Any]) -> None:
        expected = self._source.key_count
        if expected is not None and len(keys) != expected:
            raise ValueError(f"script {self._source.name} takes {expected} keys, was given {len(keys)}")

    async def __call__(self, keys: Sequence[Any], args: Sequence[Any] = ()) -> Any:
        self._check(keys)
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
            self._check(keys)
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
