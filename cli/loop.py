"""Run a process's main coroutine on uvloop when it is installed (it comes with uvicorn[standard]).

``asyncio.run`` would give the stock selector loop even where uvicorn.run would have picked uvloop; every
stage and the API pay for that on each await.
"""

from __future__ import annotations

import asyncio
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
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(main)
