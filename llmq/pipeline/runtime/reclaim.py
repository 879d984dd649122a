"""Reclaiming: take over a dead consumer's entries, dead-letter poison, and keep live work's leases.

- ``claim``: XAUTOCLAIM entries idle past the claim timeout (their consumer died or stalled).
- ``claim_dead``: the entries of a consumer whose name lease has expired (its process is gone, e.g. a pod
  replaced under a new name), taken at once instead of after the claim timeout.
- ``take``: re-read entries of one's own pending list, only those one still owns (``scripts/take.lua``).
- ``give_back``: on a clean stop, entries handed back unhandled do not count their last delivery.
- ``drop_poison``: an entry delivered more than ``max_deliveries`` times goes to the dead-letter stream
  with its reason and is acked in the same commit, so it can never crash consumers in a loop. A poison
  message's end is recorded like any other (status "dead", a ``done`` entry for the archive), so it is on
  record and replayable with ``llmq-stage dlq replay``.
- ``renew``: the owner of a slow entry resets its idle time (XCLAIM … JUSTID, which does not count a
  delivery) so XAUTOCLAIM never steals live work; only entries it still owns (checked atomically).
- ``forget_dead_consumers``: XGROUP DELCONSUMER orphans pending entries, so only consumers with
  nothing pending and no live lease are removed, checked atomically with the delete.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection
from typing import Any

import msgspec
import redis.asyncio as aioredis

from llmq.pipeline import metrics, transitions
from llmq.pipeline.dlq import dead_letter
from llmq.pipeline.keys import Keys
from llmq.pipeline.lua import Lua
from llmq.pipeline.models import FIELD, Outcome, Status, decode_message
from llmq.pipeline.runtime.effects import Commit, Effect
from llmq.pipeline.runtime.streams import Entry, as_str, parse_entries

log = logging.getLogger("llmq.reclaim")

Delivered = tuple[Entry, int]
"""An entry and how many times it has been delivered, this time included."""


class Reclaimer:
    def __init__(
        self,
        *,
        redis: aioredis.Redis,
        keys: Keys,
        stream: str,
        group: str,
        consumer: str,
        commit: Commit,
        claim_timeout_s: float,
        max_deliveries: int,
        result_retention_s: float,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.commit = commit
        self.claim_timeout_ms = int(claim_timeout_s * 1000)
        self.max_deliveries = max_deliveries
        self.result_retention_s = result_retention_s
        self._renew = Lua(redis, "renew")
        self._take = Lua(redis, "take")
        self._forget = Lua(redis, "forget")
        self._give_back = Lua(redis, "give_back")

    async def claim(self, count: int, *, skip: Collection[str] = ()) -> list[Delivered]:
        """Claim up to ``count`` entries idle past the claim timeout, except ``skip`` (in hand already);
        poison ones are dead-lettered."""
        claimed: list[Entry] = []
        cursor = "0-0"
        while len(claimed) < count:
            reply = await self.redis.xautoclaim(
                self.stream,
                self.group,
                self.consumer,
                min_idle_time=self.claim_timeout_ms,
                start_id=cursor,
                count=count - len(claimed),
            )
            cursor = as_str(reply[0])
            claimed.extend(e for e in parse_entries(reply[1]) if e.data and e.id not in skip)
            deleted = reply[2] if len(reply) > 2 else []
            if deleted:
                # XAUTOCLAIM already removed them from the PEL: they were trimmed while pending.
                log.warning(
                    "pending entries were trimmed before anyone handled them",
                    extra={"stage": self.group, "entry_ids": [as_str(d) for d in deleted]},
                )
            if cursor == "0-0":
                break
        if not claimed:
            return []
        metrics.RECLAIMED.labels(stage=self.group).inc(len(claimed))
        log.info(
            "reclaimed %d entries idle over %dms",
            len(claimed),
            self.claim_timeout_ms,
            extra={"stage": self.group, "consumer": self.consumer, "entries": len(claimed)},
        )
        return await self.drop_poison(await self._deliveries(claimed))

    async def claim_dead(self, count: int) -> list[Delivered]:
        """Take up to ``count`` entries of consumers whose name lease has expired, at once."""
        taken: list[Delivered] = []
        for info in await self.redis.xinfo_consumers(self.stream, self.group):
            name = as_str(info["name"])
            if name == self.consumer or not int(info["pending"]) or len(taken) >= count:
                continue
            lease = self.keys.consumer_lease(self.group, name)
            if await self.redis.exists(lease):
                continue
            rows: Any = await self.redis.xpending_range(
                self.stream, self.group, min="-", max="+", count=count - len(taken), consumername=name
            )
            ids = [as_str(r["message_id"]) for r in rows]
            mine = await self.take(ids, owner=name, lease=lease)
            if mine:
                metrics.RECLAIMED.labels(stage=self.group).inc(len(mine))
                log.info(
                    "took over %d entries of consumer %s, whose lease expired",
                    len(mine),
                    name,
                    extra={"stage": self.group, "consumer": self.consumer, "entries": len(mine), "from": name},
                )
            taken += mine
        return await self.drop_poison(taken) if taken else []

    async def take(self, entry_ids: list[str], *, owner: str, lease: str | None = None) -> list[Delivered]:
        """Claim the entries of ``entry_ids`` that still belong to ``owner`` (and only while ``lease``, its name
        lease, is gone, when given), with their delivery counts."""
        if not entry_ids:
            return []
        keys = [self.stream] if lease is None else [self.stream, lease]
        rows = await self._take(keys, [self.group, self.consumer, owner, *entry_ids])
        return [(Entry(as_str(eid), _payload(fields)), int(n)) for eid, fields, n in rows]

    async def _deliveries(self, entries: list[Entry]) -> list[Delivered]:
        pipe = self.redis.pipeline(transaction=False)
        for e in entries:
            pipe.xpending_range(self.stream, self.group, e.id, e.id, 1, consumername=self.consumer)
        rows = await pipe.execute()
        # an entry no longer listed as ours was acked or claimed by someone else meanwhile
        return [(e, int(row[0]["times_delivered"])) for e, row in zip(entries, rows, strict=True) if row]

    async def drop_poison(self, delivered: list[Delivered]) -> list[Delivered]:
        """Dead-letter and ack the entries delivered more than ``max_deliveries`` times; return the rest."""
        keep = [(e, n) for e, n in delivered if n <= self.max_deliveries]
        poison = [(e, n) for e, n in delivered if n > self.max_deliveries]
        if poison:
            acked = await self.commit([(e.id, self._dead(e, n)) for e, n in poison])
            metrics.POISON.labels(stage=self.group).inc(sum(acked))
            log.error(
                "dead-lettered %d poison entries",
                sum(acked),
                extra={
                    "stage": self.group,
                    "entry_ids": [e.id for (e, _), ok in zip(poison, acked, strict=True) if ok],
                },
            )
        return keep

    def _dead(self, entry: Entry, deliveries: int) -> list[Effect]:
        reason = f"delivered {deliveries} times (max_deliveries {self.max_deliveries})"
        msg = None
        if self.stream != self.keys.done:  # the archive's own input holds outcomes, not messages
            try:
                msg = decode_message(entry.data)
            except msgspec.DecodeError:  # not a message at all: the dead letter is its only record
                msg = None
        effects = [
            dead_letter(
                self.keys,
                payload=entry.data,
                message_id=msg.id if msg else None,
                reason=reason,
                source=self.stream,
                fields={b"group": self.group, b"entry_id": entry.id, b"deliveries": str(deliveries)},
            )
        ]
        if msg is not None:
            outcome = Outcome(message=msg, status=Status.DEAD, error=f"poison: {reason}", finished_at=time.time())
            effects.append(transitions.ended(self.keys, outcome, retention_s=self.result_retention_s, cancellable=True))
        return effects

    async def renew(self, entry_ids: list[str]) -> set[str]:
        """Reset the idle time of entries this consumer still owns; return the ids it no longer owns."""
        lost = await self._renew([self.stream], [self.group, self.consumer, *entry_ids])
        lost_ids = {as_str(x) for x in lost}
        if lost_ids:
            metrics.LEASES_LOST.labels(stage=self.group).inc(len(lost_ids))
        return lost_ids

    async def give_back(self, delivered: list[Delivered]) -> int:
        """Undo the last delivery of entries handed back unhandled on a clean stop, each delivered the number of
        times given (so that a resent call undoes nothing more)."""
        args = [x for e, n in delivered for x in (e.id, n)]
        return int(await self._give_back([self.stream], [self.group, self.consumer, *args]))

    async def forget_dead_consumers(self) -> list[str]:
        """Delete consumers that have nothing pending, no live lease and have been idle a claim timeout."""
        forgotten = []
        for info in await self.redis.xinfo_consumers(self.stream, self.group):
            name = as_str(info["name"])
            if name == self.consumer or int(info["pending"]) or int(info["idle"]) < self.claim_timeout_ms:
                continue
            lease = self.keys.consumer_lease(self.group, name)
            if await self._forget([self.stream, lease], [self.group, name]):
                forgotten.append(name)
        if forgotten:
            log.info("removed dead consumers", extra={"stage": self.group, "consumers": forgotten})
        return forgotten


def _payload(fields: list[bytes]) -> bytes:
    """The message field's value from a flat field/value list."""
    pairs = dict(zip(fields[0::2], fields[1::2], strict=True))
    return pairs.get(FIELD, b"")
