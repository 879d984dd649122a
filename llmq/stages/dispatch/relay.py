"""A streamed call's chunks into its message's events stream (``llmq.pipeline.streamed``), as they come.

Chunks that arrive in one turn of the event loop (one read from the backend) go to Redis in one script
call (``scripts/relay-2.lua``), so a chunk waits at most the round trip before it, and Redis sees one call
per read instead of one per token; the calls of every stream relayed in that turn share one round trip
(``Coalesced``: with 200 streams at once, relaying cost the dispatcher 76 µs of CPU per chunk when each
stream made its own). Each entry has an id of our own (``<ms>-<n>``, n counting the call's
chunks), so a write resent after a lost reply is skipped instead of written twice; the call's first write
claims the stream for it, so a call that lost its message to another dispatcher is refused (``refused``). A
write also learns whether the call is to stop (``aborted``: its client went away, ``abort_on_disconnect``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

from llmq.pipeline.lua import Coalesced
from llmq.pipeline.streamed import CHUNK, LIVE_TTL_S, MAX_EVENTS, USAGE

log = logging.getLogger("llmq.dispatch")


class Relay:
    def __init__(self, script: Coalesced, key: str, status_key: str, *, backend: str, sent_at: float) -> None:
        self.key = key
        self.backend = backend
        self.sent_at = sent_at
        """When the call was sent (Unix seconds): its time to first token counts from there, not from the
        message's dispatch (which may have waited for a backend slot)."""
        self.status_key = status_key
        self._script = script
        self.token = os.urandom(8).hex()
        self.base_ms = int(time.time() * 1000)
        self.written = 0
        """Chunks handed to the relay: once one is, the client may have seen it."""
        self.first_token_ms: float | None = None
        """The call's time from being sent to its first chunk."""
        self.refused = False
        """Another call owns the stream (this one's message was taken over), or it has ended."""
        self.aborted = False
        """The message's streaming client went away and its level stops the call (``abort_on_disconnect``)."""
        self._waiting: list[bytes | str] = []
        self._task: asyncio.Task[None] | None = None

    def add(self, data: bytes, *, usage_only: bool = False) -> None:
        """One chunk as the backend sent it (a ``usage``-only chunk apart: relayed to clients that asked)."""
        self.written += 1
        if self.first_token_ms is None:
            self.first_token_ms = max(0.0, (time.time() - self.sent_at) * 1000)
        self._waiting += [f"{self.base_ms}-{self.written}", USAGE if usage_only else CHUNK, data]
        if self._task is None:
            self._task = asyncio.create_task(self._flush())

    async def close(self) -> None:
        """Wait until every chunk is written (or could not be: then it is logged, and the outcome still
        records the whole answer)."""
        if self._task is not None:
            await self._task

    async def _flush(self) -> None:
        try:
            # the task runs a turn later: the chunks of this turn's read are in
            while self._waiting and not (self.refused or self.aborted):
                batch, self._waiting = self._waiting, []
                marker = f"{self.base_ms}-0"
                args = [self.token, LIVE_TTL_S, MAX_EVENTS, marker, self.first_token_ms or 0, self.backend, *batch]
                written = await self._script([self.key, self.status_key], args)
                self.refused, self.aborted = written == 0, written == 2
        except Exception:  # a boundary: the call goes on; clients miss chunks, the outcome has them all
            log.warning("could not relay chunks to %s", self.key, exc_info=True)
            self._waiting = []
        finally:
            self._task = None
