"""Background tasks of a stage (timers, probes, listeners): stopping one, and waiting in one, the same way
everywhere."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

log = logging.getLogger("llmq.tasks")
RECANCEL_S = 1.0


async def cancel(task: asyncio.Task[Any] | None) -> None:
    """Cancel the task (if any) and wait until it has finished unwinding.

    Cancels again every second until it has: a cancellation can be lost inside a library (redis-py may
    turn a cancelled read into a ConnectionError, which a loop then treats as a Redis outage and goes
    on), and waiting on such a task once would wait forever.
    """
    if task is None:
        return
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=RECANCEL_S)
        if not task.done():
            log.warning("task %s went on after cancel(); cancelling again", task.get_name())
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def wait_event(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait until ``event`` is set or ``timeout_s`` passes; True when it is set.

    Not ``asyncio.wait_for``: on Python 3.11 it swallows a cancellation that arrives just as the event is
    set, so a loop waiting on it in a background task survives ``cancel()`` and whoever awaits the task
    hangs. ``asyncio.timeout`` keeps the cancellation.
    """
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            await event.wait()
    return event.is_set()
