"""Run one consuming stage as this process: connect, take a consumer name, serve ops, loop, shut down.

Shutdown order: the first SIGTERM/SIGINT stops reading; in-hand batches finish (or stay pending) within
``queue.worker.shutdown_grace``; the lease is released, pools closed, one summary line logged, exit 0.
A second signal exits at once (code 130). SIGUSR1 reopens the log file.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis.asyncio as aioredis

from llmq.cli.exit_codes import ExitCode
from llmq.pipeline.backoff import Backoff
from llmq.pipeline.config import Config
from llmq.pipeline.errors import ConnectError, ConsumerNameTaken
from llmq.pipeline.keys import Keys
from llmq.pipeline.logging import reopen_logs
from llmq.pipeline.redis import UNAVAILABLE, describe, make_redis, wait_for_redis
from llmq.pipeline.runtime import targets
from llmq.pipeline.runtime.names import ConsumerLease
from llmq.pipeline.runtime.ops_server import OpsServer, ops_app
from llmq.pipeline.runtime.runner import Runner, RunnerSettings
from llmq.pipeline.runtime.stage import Stage

log = logging.getLogger("llmq.cli")

LEASE_MAX_S = 15.0
"""Longest a consumer name lease lasts: how soon a dead consumer's entries are taken over (``consumer_lease_s``)."""
StageFactory = Callable[..., Stage | Sequence[Stage]]
"""Builds a stage (or several of one group, each on its own stream) from keyword arguments ``config``,
``redis`` and ``keys``."""


def runner_settings(config: Config, *, max_in_hand: int | None = None) -> RunnerSettings:
    w = config.queue.worker
    return RunnerSettings(
        batch_size=w.max_batch_size,
        block_ms=max(1, int(w.process_interval.seconds * 1000)),
        max_in_hand=max_in_hand or w.max_batch_size,
        claim_timeout_s=w.claim_timeout.seconds,
        max_deliveries=w.max_deliveries,
        grace_s=w.shutdown_grace.seconds,
        result_retention_s=config.queue.result_retention.seconds,
        consumer_lease_s=consumer_lease_s(config),
    )


def consumer_lease_s(config: Config) -> float:
    """How long a consumer name is held without a refresh (refreshed every third of it): at most
    ``LEASE_MAX_S``, so a dead consumer's entries are taken over soon; never longer than the claim timeout."""
    return max(1.0, min(config.queue.worker.claim_timeout.seconds, LEASE_MAX_S))


async def consume(
    factory: StageFactory,
    config: Config,
    *,
    consumer: str | None,
    port: int,
    log_handler: logging.Handler,
    connect_timeout_s: float,
) -> ExitCode:
    redis = make_redis(config.redis)
    try:
        try:
            await wait_for_redis(redis, config.redis, timeout_s=connect_timeout_s)
        except ConnectError as exc:
            log.error("%s", exc)
            return ExitCode.CONNECT
        keys = Keys(config.redis.key_prefix)
        made = factory(config=config, redis=redis, keys=keys)
        stages = [made] if isinstance(made, Stage) else list(made)
        return await _serve(stages, config, redis, keys, consumer, port, log_handler, connect_timeout_s)
    finally:
        await redis.aclose()


async def _serve(
    stages: list[Stage],
    config: Config,
    redis: aioredis.Redis,
    keys: Keys,
    consumer: str | None,
    port: int,
    log_handler: logging.Handler,
    connect_timeout_s: float,
) -> ExitCode:
    group = stages[0].name
    lease = ConsumerLease(redis=redis, keys=keys, group=group, ttl_s=consumer_lease_s(config))
    backoff = Backoff(initial_s=0.1, max_s=5.0)
    deadline = time.monotonic() + connect_timeout_s
    while True:
        try:
            name = await lease.acquire(consumer)
            break
        except ConsumerNameTaken as exc:
            log.error("%s", exc)
            return ExitCode.CONSUMER_NAME
        except UNAVAILABLE as exc:  # answering PING, but refusing writes (out of memory, a replica, ...)
            if time.monotonic() >= deadline:
                log.error("cannot take a consumer name at %s: %s", describe(config.redis), exc)
                return ExitCode.CONNECT
            log.warning("cannot take a consumer name yet, retrying: %s", exc)
            await asyncio.sleep(backoff.next())
    settings = runner_settings(config)
    runners = [Runner(st, redis=redis, keys=keys, consumer=name, settings=settings) for st in stages]
    started = time.monotonic()

    async def health() -> dict[str, Any]:
        checks: dict[str, str] = {}
        try:
            await asyncio.wait_for(redis.ping(), timeout=1.0)
            # answering PING, but perhaps refusing this stage's writes (full, a replica) or its commands
            refused = next((r.redis_error for r in runners if r.redis_error), None)
            checks["redis"] = "ok" if all(r.redis_ok for r in runners) and not refused else "degraded"
            if refused:
                checks["redis_error"] = refused
        except (TimeoutError, *UNAVAILABLE):
            checks["redis"] = "down"
        for st in stages:
            checks.update(await st.health())
        status = "down" if checks["redis"] == "down" else "ok"
        if status == "ok" and any(v != "ok" for k, v in checks.items() if k != "redis_error"):
            status = "degraded"
        return {
            "status": status,
            "stage": group,
            "consumer": name,
            "checks": checks,
            "in_hand": sum(len(r.in_hand) for r in runners),
            "handled": sum(r.handled for r in runners),
            "uptime_s": round(time.monotonic() - started, 1),
        }

    ops = OpsServer(ops_app(health, metrics_path=config.metrics.path), host=config.server.host, port=port)
    ops.start()
    ctx = {"stage": group, "consumer": name}
    target = None
    if config.metrics.targets_dir is not None:
        try:
            target = targets.announce(
                config.metrics.targets_dir,
                stage=group,
                consumer=name,
                host=config.metrics.targets_host or config.server.host,
                port=ops.port,
            )
        except OSError as exc:  # scraped or not, the stage does its work
            log.error("could not write the Prometheus target file in metrics.targets_dir: %s", exc, extra=ctx)
    loop = asyncio.get_running_loop()
    signals_seen = 0

    def on_stop_signal(signum: int) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen > 1:
            log.warning("second %s: exiting now", signal.Signals(signum).name, extra=ctx)
            os._exit(ExitCode.INTERRUPTED)
        log.info("%s: stopping, finishing in-hand work", signal.Signals(signum).name, extra=ctx)
        for r in runners:
            r.stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop_signal, sig)
    loop.add_signal_handler(signal.SIGUSR1, reopen_logs, log_handler)
    # Announced only once every signal has its handler: "started" means safe to signal.
    log.info(
        "stage started: stream %s, redis %s, ops http://%s:%d",
        ", ".join(st.stream for st in stages),
        describe(config.redis),
        config.server.host,
        ops.port,
        extra={**ctx, "ops_port": ops.port},
    )

    code = ExitCode.OK
    opened: list[Stage] = []

    async def run_all() -> None:
        await asyncio.gather(*(r.run() for r in runners))

    keep: asyncio.Task[None] | None = None
    try:  # whatever fails from here (a stage's start too) stops the ops port, its target and the lease
        for st in stages:
            await st.start()
            opened.append(st)
        run = asyncio.create_task(run_all(), name="runners")
        keep = asyncio.create_task(lease.keep(), name="lease")
        done, _ = await asyncio.wait({run, keep}, return_when=asyncio.FIRST_COMPLETED)
        if keep in done:
            log.error("%s", keep.exception(), extra=ctx)
            code = ExitCode.CONSUMER_NAME
            for r in runners:
                r.stop()
        await run
    finally:
        if keep is not None:
            keep.cancel()
        for st in reversed(opened):
            await st.close()
        await ops.stop()
        if target is not None:
            targets.withdraw(target)
        try:
            await lease.release()
        except UNAVAILABLE:
            log.warning("could not release the consumer lease; it expires by itself", extra=ctx)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            loop.remove_signal_handler(sig)
    handled = sum(r.handled for r in runners)
    log.info(
        "stage stopped: handled %d entries in %.1fs",
        handled,
        time.monotonic() - started,
        extra={**ctx, "handled": handled},
    )
    return code
