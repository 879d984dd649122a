"""What a stage decided for the entries handed to it, committed in one call of ``scripts/commit.lua``.

A stage decides per entry and records the decision on the Batch: ``ack`` it with the effects of the
decision (``llmq.pipeline.runtime.effects``: a hand-off to the next stream, an outcome, a status…), or
``forward`` it. A commit acks each entry and runs its effects only when that XACK acked it, so it is safe
to repeat: it is retried while Redis is unreachable, and a resent one (a lost reply) changes nothing twice.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from llmq.pipeline.backoff import Backoff
from llmq.pipeline.redis import UNAVAILABLE
from llmq.pipeline.runtime.effects import Commit, Effect, Record, xadd
from llmq.pipeline.runtime.streams import Entry

log = logging.getLogger("llmq.stage")


class Batch:
    """The entries handed to a stage in one call, and what the stage decided for each.

    Decisions commit together in one script call: when ``handle`` returns, or earlier at each ``await
    batch.commit()``, which lets a stage that handles entries concurrently (dispatch) or over time
    (schedule) commit each as it finishes.
    """

    __slots__ = (
        "_commit",
        "_committing",
        "_on_commit",
        "_records",
        "_settled",
        "consumer",
        "entries",
        "group",
        "owned_for_sure",
    )

    def __init__(
        self,
        entries: list[Entry],
        *,
        commit: Commit,
        consumer: str,
        on_commit: Callable[[list[str], int], None],
        owned_for_sure: bool = True,
    ) -> None:
        self.entries = entries
        self.group = commit.group
        self.consumer = consumer
        """The consumer the entries were delivered to (a script may check it still owns them)."""
        self.owned_for_sure = owned_for_sure
        """The entries came into hand too recently for any other consumer to have taken one over (before the
        first renewal of their lease); False for a batch handled again, or held long: check before acting
        outside Redis."""
        self._commit = commit
        self._on_commit = on_commit
        self._records: list[Record] = []
        self._settled: list[str] = []
        self._committing = asyncio.Lock()

    def ack(self, entry: Entry, *effects: Effect) -> None:
        """The entry is finished; it is acked at the next commit, and its effects run only if that ack
        acked it (not when another consumer settled it first)."""
        self._records.append((entry.id, effects))

    def forward(self, entry: Entry, stream: str, payload: bytes) -> None:
        """Hand the entry to the next stream: XADD there and XACK here, in the same commit."""
        self.ack(entry, xadd(stream, payload))

    def also(self, *effects: Effect) -> None:
        """Effects of no entry, run at the next commit whatever it acks: they must be safe to repeat."""
        self._records.append(("", effects))

    def settled(self, entry: Entry) -> None:
        """The entry was already acked by a script of the stage, atomically with its hand-off."""
        self._settled.append(entry.id)

    @property
    def decided(self) -> bool:
        """Something waits to be committed."""
        return bool(self._records or self._settled)

    async def commit(self) -> None:
        """Execute what was decided so far.

        Group commit: the decisions are swapped out before executing, so other coroutines of the same
        stage keep deciding meanwhile, and those that call ``commit`` during an execute wait for it, then
        the first of them commits everything decided by all of them in one call. The call is retried
        while Redis is unreachable: it is safe to repeat, and giving up would leave the entries to be
        handled again (another backend call) although their outcome is known.
        """
        async with self._committing:
            records, settled = self._records, self._settled
            self._records, self._settled = [], []
            acked: list[bool] = []
            if records:
                acked = await self._send(records)
            entry_ids = [entry_id for entry_id, _ in records if entry_id]
            if entry_ids or settled:
                self._on_commit(entry_ids + settled, acked.count(False))

    async def _send(self, records: list[Record]) -> list[bool]:
        backoff = Backoff(initial_s=0.05, max_s=2.0)
        while True:
            try:
                return await self._commit(records)
            except UNAVAILABLE as exc:
                log.warning("commit failed, retrying: %s", exc, extra={"stage": self._commit.group})
                await asyncio.sleep(backoff.next())

    def discard(self) -> None:
        self._records, self._settled = [], []
