"""The stages ``llmq-stage run`` and ``llmq-stage up`` know, with their default ports."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cli.consume import StageFactory
from pipeline.config import Config


@dataclass(frozen=True, slots=True)
class StageSpec:
    name: str
    summary: str
    default_port: Callable[[Config], int]
    """The port of the first process of the stage; further processes on one host take a free port."""
    factory: StageFactory | None = None
    """Builds the consuming stage; None for ingest, which serves HTTP instead of consuming a stream."""


STAGES: dict[str, StageSpec] = {
    spec.name: spec
    for spec in (
        StageSpec(
            name="ingest",
            summary="the HTTP API (server.port, default 8080): requests enter the queue here",
            default_port=lambda c: c.server.port,
        ),
    )
}
