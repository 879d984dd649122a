"""Background tasks of a stage (timers, probes, listeners): stopping one, and waiting in one, the same way
everywhere."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def cancel(task: asyncio.Task[Any] | None) -> None:
    """Cancel the task (if any) and wait until it has finished unwinding."""
    if task is None:
        return
    task.cancel()
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
