"""How fast each level drains, for a waiting message's position and estimated wait.

A level's entries leave it when the scheduler acks them (admitted, or ended while waiting); Redis counts
them for the schedule group (``entries-read`` minus ``pending``, ``XINFO GROUPS``). The submit script keeps,
in the status hash, the depth before a message (``behind``) and that count when it was queued
(``left_mark``): its position now is ``behind`` less how many have left since. The meter reads the counts
once a second while someone asks, and the rate is their moving average, so the estimate follows what the
level really does (its share of the backends under the other levels' traffic), not a constant.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any

import redis.asyncio as aioredis

from llmq.pipeline import background
from llmq.pipeline.keys import Group, Keys
from llmq.pipeline.redis import UNAVAILABLE
from llmq.pipeline.runtime.streams import as_str

log = logging.getLogger("llmq.ingest")

SAMPLE_S = 1.0
WANTED_FOR_S = 5.0
"""The meter reads Redis only while an estimate was asked for this recently."""
MIN_RATE = 0.01
"""Entries per second below which a level is not draining: no estimate (a stalled level's moving rate decays
toward zero and would estimate an endless wait)."""
MAX_RETRY_AFTER_S = 60
FRESH_S = 2.5 * SAMPLE_S
"""Counts older than this are not used: the meter had paused, or a read failed."""
SMOOTHING = 0.3
"""Weight of the newest second in the moving average of a level's rate."""


class DrainMeter:
    def __init__(self, redis: aioredis.Redis, keys: Keys, levels: list[str]) -> None:
        self.redis = redis
        self.keys = keys
        self.levels = levels
        self.left: dict[str, int] = {}
        """The latest count of each level's entries that have left it."""
        self.rate: dict[str, float] = {}
        """Entries leaving each level per second (moving average)."""
        self._sampled_at: float | None = None
        self._wanted_at = -math.inf
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="drain-meter")

    async def close(self) -> None:
        await background.cancel(self._task)

    def position(self, level: str, behind: int, left_mark: int) -> tuple[int, float | None]:
        """A queued message's position (how many wait before it, never more than when it came) and its
        estimated wait in seconds (None when the level has not been seen draining lately). A count older
        than the message's (read before a quiet spell, or of a stream made anew) tells nothing: then the
        position is the one it came with."""
        left = self.left.get(level) if self._fresh() else None
        ahead = behind if left is None or left < left_mark else max(0, behind - (left - left_mark))
        return ahead, self.wait_s(level, ahead)

    def wait_s(self, level: str, ahead: int) -> float | None:
        """The estimated wait of a message with ``ahead`` before it in ``level``: they and it leaving at the
        level's rate (None when it has not been seen draining lately)."""
        rate = self._rate(level)
        return round((ahead + 1) / rate, 1) if rate is not None else None

    def retry_after_s(self, level: str, over: int) -> int:
        """Seconds until ``over`` messages will have left ``level`` (a full level's excess, for Retry-After): at
        least 1, at most ``MAX_RETRY_AFTER_S``; 1 when the level has not been seen draining lately."""
        rate = self._rate(level)
        return 1 if rate is None else max(1, min(MAX_RETRY_AFTER_S, math.ceil(over / rate)))

    def _rate(self, level: str) -> float | None:
        """The level's rate, when it was read lately and is one of a level draining (``MIN_RATE``); asking
        keeps the meter reading."""
        self._wanted_at = time.monotonic()
        rate = self.rate.get(level) if self._fresh() else None
        return rate if rate is not None and rate >= MIN_RATE else None

    def _fresh(self) -> bool:
        """The counts were read within the last two samples (the meter reads only while asked)."""
        return self._sampled_at is not None and time.monotonic() - self._sampled_at <= FRESH_S

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(SAMPLE_S)
            if time.monotonic() - self._wanted_at > WANTED_FOR_S:
                self._sampled_at = None  # the next sample after a pause starts the rate afresh
                self.rate.clear()
                continue
            try:
                await self._sample()
            except UNAVAILABLE as exc:
                log.warning("could not read the levels' drain: %s", exc)
            except Exception:  # a loop boundary: estimates are a courtesy, never a reason to stop serving
                log.error("reading the levels' drain failed", exc_info=True)

    async def _sample(self) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for level in self.levels:
            pipe.xinfo_groups(self.keys.level(level))
        replies = await pipe.execute(raise_on_error=False)
        now = time.monotonic()
        elapsed = now - self._sampled_at if self._sampled_at is not None else None
        for level, groups in zip(self.levels, replies, strict=True):
            left = _left(groups)
            if left is None:
                continue
            before = self.left.get(level)
            self.left[level] = left
            if elapsed and before is not None:
                now_rate = max(0, left - before) / elapsed
                old = self.rate.get(level)
                self.rate[level] = now_rate if old is None else SMOOTHING * now_rate + (1 - SMOOTHING) * old
        self._sampled_at = now


def _left(groups: Any) -> int | None:
    if not isinstance(groups, list):
        return None  # no such stream yet, or an error for this level
    for group in groups:
        if as_str(group.get("name", b"")) != Group.SCHEDULE:
            continue
        read = group.get("entries-read")
        if read is None and as_str(group.get("last-delivered-id", b"")) == "0-0":
            read = 0  # a group that has read nothing yet says no entries-read: none has left
        return None if read is None else int(read) - int(group["pending"])
    return None
