"""The stages ``llmq-stage run`` and ``llmq-stage up`` know, with their default ports."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llmq.cli.consume import StageFactory
from llmq.pipeline.config import Config, PostgresConfig
from llmq.pipeline.db import make_pool
from llmq.pipeline.runtime.stage import Stage
from llmq.stages.archive import Archive
from llmq.stages.batch import BatchStage
from llmq.stages.dispatch import Dispatch
from llmq.stages.retry import Retry
from llmq.stages.schedule import make_stages as make_schedule
from llmq.stages.webhooks import WebhookSender

MOCK_BACKEND_PORT = 8090


def postgres_of(config: Config) -> PostgresConfig:
    """The configured PostgreSQL, or the seed's defaults (localhost:5432, llm_queue)."""
    return config.database.postgres or PostgresConfig()


def make_archive(*, config: Config, **clients: Any) -> Archive:
    pg = postgres_of(config)
    return Archive(config=config, pool=make_pool(pg), conninfo=pg.conninfo, **clients)


def make_retry(**clients: Any) -> list[Stage]:
    """The retry stage, and the webhook deliveries it retries likewise (the retry group, on its own stream)."""
    return [Retry(**clients), WebhookSender(**clients)]


def make_batch(*, config: Config, **clients: Any) -> BatchStage:
    pg = postgres_of(config)
    return BatchStage(config=config, pool=make_pool(pg), conninfo=pg.conninfo, **clients)


@dataclass(frozen=True, slots=True)
class StageSpec:
    name: str
    summary: str
    default_port: Callable[[Config], int]
    """The port of the first process of the stage; further processes on one host take a free port."""
    factory: StageFactory | None = None
    """Builds the consuming stage; None for the HTTP servers (ingest, mock-backend)."""
    in_up: bool = True
    """Whether ``llmq-stage up`` runs it (the mock backend only when no backend is configured)."""
    needs_postgres: bool = False


STAGES: dict[str, StageSpec] = {
    spec.name: spec
    for spec in (
        StageSpec(
            name="ingest",
            summary="the HTTP API (server.port, default 8080): requests enter the queue here",
            default_port=lambda c: c.server.port,
        ),
        StageSpec(
            name="schedule",
            summary="admits messages from the level streams in priority order (ops port metrics.port)",
            default_port=lambda c: c.metrics.port,
            factory=make_schedule,
        ),
        StageSpec(
            name="dispatch",
            summary="calls the backends and records outcomes (ops port metrics.port + 1)",
            default_port=lambda c: c.metrics.port + 1,
            factory=Dispatch,
        ),
        StageSpec(
            name="retry",
            summary="backs off failed messages and dead-letters exhausted ones (ops port metrics.port + 2)",
            default_port=lambda c: c.metrics.port + 2,
            factory=make_retry,
        ),
        StageSpec(
            name="archive",
            summary="writes outcomes to PostgreSQL and trims acked stream entries (ops port metrics.port + 3)",
            default_port=lambda c: c.metrics.port + 3,
            factory=make_archive,
            needs_postgres=True,
        ),
        StageSpec(
            name="batch",
            summary="runs the Batch API's batches: feeds their lines, writes their output (ops port metrics.port + 4)",
            default_port=lambda c: c.metrics.port + 4,
            factory=make_batch,
            needs_postgres=True,
        ),
        StageSpec(
            name="mock-backend",
            summary=f"an OpenAI-compatible mock LLM server (port {MOCK_BACKEND_PORT})",
            default_port=lambda c: MOCK_BACKEND_PORT,
            in_up=False,
        ),
    )
}
