"""The interface of a consuming stage: its own decision per batch; the runner owns the loop around it."""

from __future__ import annotations

import abc

from llmq.pipeline.runtime.batch import Batch


class Stage(abc.ABC):
    """A consuming stage: its own decision per batch; the runner owns the loop around it."""

    name: str
    """Also the consumer group name."""
    stream: str
    """The stream the stage consumes."""

    @abc.abstractmethod
    async def handle(self, batch: Batch) -> None:
        """Decide for each entry of the batch (``batch.ack`` / ``batch.forward``). Must be idempotent:
        an entry can be delivered again after its consumer died."""

    async def start(self) -> None:
        """Open what the stage needs beyond Redis (pools, clients). Called before the first read."""

    async def close(self) -> None:
        """Release what ``start`` opened. Called after the last batch committed."""

    def on_stop(self) -> None:
        """Shutdown began: a stage whose ``handle`` waits (for capacity, say) should give entries back now
        (leave them unsettled) instead of holding them through the grace period."""

    async def health(self) -> dict[str, str]:
        """Component checks beyond Redis, e.g. ``{"postgres": "ok"}``; "degraded" or "down" values count."""
        return {}

    max_in_hand: int | None = None
    """Most entries this stage holds at once (read, not committed); the runner's setting when None."""
