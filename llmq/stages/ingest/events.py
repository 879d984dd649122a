"""Following the events streams of streamed messages (``llmq.pipeline.streamed``) for every client of this
process, with one connection: one blocking XREAD over all the streams followed, not one per client.

A client's ``Follower`` starts after the event id it gave (``Last-Event-ID``), or at the start; the hub
reads each stream from the earliest position any of its followers needs, and hands each follower only
what is past its own. When a follower comes or goes, the blocked XREAD is woken (CLIENT UNBLOCK) to read
the new set of streams at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import redis.asyncio as aioredis

from llmq.pipeline.backoff import Backoff
from llmq.pipeline.redis import UNAVAILABLE
from llmq.pipeline.runtime.streams import as_str

log = logging.getLogger("llmq.ingest")

MAX_BEHIND = 10_000
"""Events a follower may have waiting: a client that reads slower than its stream is cut off past it (it
resumes with Last-Event-ID), so one slow reader cannot fill the process's memory."""
BLOCK_MS = 1000
"""Longest a read blocks: a follower that came while its XREAD was being sent waits at most this long."""
PER_READ = 500
Event = tuple[str, dict[bytes, bytes]]
"""An entry of an events stream: its id and fields."""


def _order(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


class Follower:
    def __init__(self, key: str, after: str) -> None:
        self.key = key
        self.last = after
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.overrun = False
        """It fell ``MAX_BEHIND`` events behind and was dropped: its client must reconnect."""

    async def next(self, timeout_s: float) -> Event | None:
        """The next event, or None when none came within ``timeout_s`` (or it was dropped: ``overrun``)."""
        if not self.queue.empty():  # no timer, no task: most events are read as soon as they are put
            return self.queue.get_nowait()
        if self.overrun:
            return None
        try:
            return await asyncio.wait_for(self.queue.get(), timeout_s)
        except TimeoutError:
            return None


class EventHub:
    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self._followers: dict[str, set[Follower]] = {}
        self._changed = asyncio.Event()
        self._reader: aioredis.Redis | None = None
        self._reader_id: int | None = None
        self._blocked = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="events")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._reader is not None:
            await self._reader.aclose()

    @property
    def following(self) -> int:
        return sum(len(f) for f in self._followers.values())

    def follow(self, key: str, after: str = "0-0") -> Follower:
        follower = Follower(key, after)
        self._followers.setdefault(key, set()).add(follower)
        self._wake()
        return follower

    def leave(self, follower: Follower) -> None:
        followers = self._followers.get(follower.key)
        if followers is not None:
            followers.discard(follower)
            if not followers:
                del self._followers[follower.key]

    def _wake(self) -> None:
        self._changed.set()
        if self._blocked and self._reader_id is not None:
            task = asyncio.create_task(self._unblock(self._reader_id))
            task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)

    async def _unblock(self, client_id: int) -> None:
        with contextlib.suppress(*UNAVAILABLE):
            await self.redis.client_unblock(client_id)

    async def _run(self) -> None:
        backoff = Backoff(initial_s=0.05, max_s=2.0)
        while True:
            if not self._followers:
                await self._changed.wait()
            self._changed.clear()
            try:
                await self._read_once()
                backoff.reset()
            except UNAVAILABLE as exc:
                log.warning("following events streams failed, retrying: %s", exc)
                self._reader_id = None
                await asyncio.sleep(backoff.next())
            except Exception:  # a loop boundary: clients keep being served after one failed read
                log.error("following events streams failed", exc_info=True)
                self._reader_id = None
                await asyncio.sleep(backoff.next())

    async def _read_once(self) -> None:
        if self._reader is None:
            self._reader = self.redis.client()
        if self._reader_id is None:
            self._reader_id = int(await self._reader.client_id())
        streams: dict[Any, Any] = {
            key: next(iter(fs)).last if len(fs) == 1 else min((f.last for f in fs), key=_order)
            for key, fs in self._followers.items()
            if fs
        }
        if not streams:
            return
        self._blocked = True
        try:
            # A follower that came after the positions were taken set _changed: do not block then.
            reply: Any = await self._reader.xread(
                streams, count=PER_READ, block=None if self._changed.is_set() else BLOCK_MS
            )
        finally:
            self._blocked = False
        if not reply:  # blocked to the end, or woken: its connection may be a new one since (a reconnect)
            self._reader_id = int(await self._reader.client_id())
        for raw_key, entries in reply or []:
            key = as_str(raw_key)
            read_from = _order(streams[key])
            # A follower that came after the positions were taken, behind them, waits for the next read:
            # handing it these would skip what lies between its position and theirs.
            ready = [f for f in self._followers.get(key, ()) if _order(f.last) >= read_from]
            for raw_id, fields in entries:
                entry_id = as_str(raw_id)
                for follower in ready:
                    if _order(entry_id) > _order(follower.last) and not follower.overrun:
                        follower.last = entry_id
                        follower.queue.put_nowait((entry_id, fields))
                        if follower.queue.qsize() >= MAX_BEHIND:
                            follower.overrun = True
                            self.leave(follower)
