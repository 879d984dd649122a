"""Supervise stage processes: start each, restart a crashed one with backoff, stop all cleanly.

Children run in their own session so a terminal's Ctrl-C reaches only the supervisor, which forwards
exactly one SIGTERM (a second signal to a stage means "exit now"). On Linux each child also gets
SIGTERM if the supervisor dies, so no stage outlives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from llmq.cli.exit_codes import ExitCode
from llmq.pipeline.backoff import Backoff

log = logging.getLogger("llmq.supervisor")

STABLE_AFTER_S = 30.0
"""A child that ran this long before crashing is restarted without the accumulated backoff."""
FATAL_EXIT_CODES = frozenset({ExitCode.CONFIG, ExitCode.USAGE})
"""Restarting cannot fix these; the supervisor stops everything and exits with the child's code."""


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


@dataclass(slots=True)
class Child:
    name: str
    argv: list[str]
    proc: asyncio.subprocess.Process | None = None
    restarts: int = 0


class Supervisor:
    def __init__(self, children: Sequence[Child], *, env: dict[str, str], grace_s: float) -> None:
        self.children = list(children)
        self.env = env
        self.grace_s = grace_s
        self._stopping = asyncio.Event()
        self._fatal: ExitCode | None = None
        self._signals = 0

    async def run(self, on_ready: Callable[[], None] | None = None) -> ExitCode:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal, sig)
        loop.add_signal_handler(signal.SIGUSR1, self._forward, signal.SIGUSR1)
        loop.add_signal_handler(signal.SIGHUP, self._forward, signal.SIGHUP)  # the ingest reloads its key file
        watchers = [asyncio.create_task(self._watch(child)) for child in self.children]
        if on_ready:
            on_ready()
        await self._stopping.wait()
        await self._stop_children()
        for w in watchers:
            w.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        if self._signals > 1:
            return ExitCode.INTERRUPTED
        return self._fatal or ExitCode.OK

    def stop(self) -> None:
        self._stopping.set()

    def _on_stop_signal(self, signum: int) -> None:
        self._signals += 1
        if self._signals == 1:
            log.info("%s: stopping all stages", signal.Signals(signum).name)
            self.stop()
        else:
            log.warning("second %s: killing all stages now", signal.Signals(signum).name)
            self._forward(signal.SIGKILL)

    def _forward(self, sig: int) -> None:
        for child in self.children:
            if child.proc and child.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.send_signal(sig)

    async def _watch(self, child: Child) -> None:
        backoff = Backoff(initial_s=0.5, max_s=30.0)
        while not self._stopping.is_set():
            started = time.monotonic()
            child.proc = await asyncio.create_subprocess_exec(
                *child.argv, env=self.env, start_new_session=True, preexec_fn=_die_with_parent
            )
            log.info("started %s (pid %d)", child.name, child.proc.pid, extra={"child": child.name})
            code = await child.proc.wait()
            if self._stopping.is_set():
                return
            if code in FATAL_EXIT_CODES:
                log.error("%s exited with %d; not restarting", child.name, code, extra={"child": child.name})
                self._fatal = ExitCode(code)
                self.stop()
                return
            if time.monotonic() - started >= STABLE_AFTER_S:
                backoff.reset()
            delay = backoff.next()
            child.restarts += 1
            log.warning(
                "%s exited with %d; restarting in %.1fs",
                child.name,
                code,
                delay,
                extra={"child": child.name, "exit_code": code, "restarts": child.restarts},
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=delay)

    async def _stop_children(self) -> None:
        self._forward(signal.SIGTERM)
        running = [c.proc for c in self.children if c.proc and c.proc.returncode is None]
        if not running:
            return
        waits = [asyncio.create_task(p.wait()) for p in running]
        _, late = await asyncio.wait(waits, timeout=self.grace_s + 5)
        if late:
            log.warning("%d stages did not stop within the grace period; killing them", len(late))
            self._forward(signal.SIGKILL)
            await asyncio.wait(late)


def stage_argv(stage: str, *extra: str) -> list[str]:
    """The command that runs one stage process with this interpreter."""
    return [sys.executable, "-m", "llmq.cli", "run", stage, *extra]


def child_env(overrides: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.update(overrides)
    return env
