"""Run a process's main coroutine on uvloop when it is installed (it comes with uvicorn[standard]), with
what was loaded at start-up kept out of the garbage collector's way.

``asyncio.run`` would give the stock selector loop even where uvicorn.run would have picked uvloop; every
stage and the API pay for that on each await.

The hot paths allocate containers by the thousand (every decoded message is a few dicts and lists), so
the cyclic collector runs often, and each full collection walked every object of the imported modules
again: about 30% of the archive's CPU. ``gc.freeze`` moves what exists when the loop starts into a
generation that is never collected; later objects are collected as before.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    gc.collect()
    gc.freeze()
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(main)
