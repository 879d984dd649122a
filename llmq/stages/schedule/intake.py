"""The intakes: one per level, each reads its level's stream alone (group ``schedule``), so a batch read
from ``low`` never rides ahead of ``realtime``, and waits for the arbiter to decide each message. Each holds
up to ``scheduler.lookahead`` messages of its level: those among which its tenants share fairly."""

from __future__ import annotations

import asyncio
import time

import redis.asyncio as aioredis
from prometheus_client import Counter

from llmq.pipeline import transitions
from llmq.pipeline.config import Config, LevelConfig
from llmq.pipeline.keys import Keys
from llmq.pipeline.models import Message, Outcome, Status, decode_message
from llmq.pipeline.runtime.batch import Batch
from llmq.pipeline.runtime.stage import Stage
from llmq.pipeline.runtime.streams import Entry
from llmq.pipeline.tokens import estimate_tokens
from llmq.stages.schedule.arbiter import GONE, GROUP, Arbiter, Candidate, Decisions

DROPPED = Counter("llmq_not_dispatched_total", "Messages ended before dispatch", ["level", "status"])


class LevelIntake(Stage):
    """Reads one level's stream and waits for the arbiter to admit each message."""

    def __init__(self, level: LevelConfig, *, config: Config, redis: aioredis.Redis, keys: Keys, arbiter: Arbiter):
        self.name = GROUP
        self.stream = keys.level(level.name)
        self.level = level
        self.redis = redis
        self.keys = keys
        self.arbiter = arbiter
        self.config = config
        self.retention_s = config.queue.result_retention.seconds
        self.max_in_hand = max(level.in_flight_cap + config.queue.worker.max_batch_size, config.scheduler.lookahead)

    async def handle(self, batch: Batch) -> None:
        """Idempotent: admission is keyed by message id (a redelivered message re-takes its own slot), and an
        expired or cancelled message is recorded once more with the same outcome."""
        now = time.time()
        messages = [decode_message(e.data) for e in batch.entries]
        pipe = self.redis.pipeline(transaction=False)
        for m in messages:
            pipe.hget(self.keys.msg(m.id), "status")
        statuses = await pipe.execute()
        decisions: Decisions = asyncio.Queue()
        waiting: list[Candidate] = []
        for entry, msg, status in zip(batch.entries, messages, statuses, strict=True):
            if status == Status.CANCELLED.value.encode():
                self._end(batch, entry, msg, Status.CANCELLED, now)
            elif msg.deadline is not None and msg.deadline < now:
                self._end(batch, entry, msg, Status.EXPIRED, now)
            else:
                cost = estimate_tokens(msg.request, msg.endpoint) / self.config.tenant(msg.tenant).weight
                waiting.append(Candidate(entry, msg, decisions, cost))
        if batch.decided:
            await batch.commit()
        if not waiting:
            return
        self.arbiter.offer(self.level.name, waiting)
        left = len(waiting)
        while left:
            decided = [await decisions.get()]
            while not decisions.empty():
                decided.append(decisions.get_nowait())
            left -= len(decided)
            for cand, outcome in decided:
                if outcome is None:
                    continue  # shutting down: left pending
                if outcome is Status.SCHEDULED or outcome == GONE:
                    batch.settled(cand.entry)
                elif outcome in (Status.EXPIRED, Status.CANCELLED):
                    self._end(batch, cand.entry, cand.message, Status(outcome), time.time())
                else:
                    batch.ack(cand.entry)  # its message ended elsewhere: nothing to record again
            await batch.commit()

    def on_stop(self) -> None:
        self.arbiter.give_back()

    def _end(self, batch: Batch, entry: Entry, msg: Message, status: Status, now: float) -> None:
        DROPPED.labels(level=msg.level, status=status.value).inc()
        outcome = Outcome(message=msg, status=status, finished_at=now)
        effect = transitions.ended(self.keys, outcome, retention_s=self.retention_s, cancellable=True)
        batch.ack(entry, effect)


class OwningIntake(LevelIntake):
    """The first intake of a process starts and stops the shared arbiter."""

    async def start(self) -> None:
        self.arbiter.start()

    async def close(self) -> None:
        await self.arbiter.close()
