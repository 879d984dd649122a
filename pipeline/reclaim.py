"""Reclaiming: take over a dead consumer's entries, dead-letter poison, and keep live work's leases.

- ``claim``: XAUTOCLAIM entries idle past the claim timeout (their consumer died or stalled).
- ``drop_poison``: an entry delivered more than ``max_deliveries`` times goes to the dead-letter stream
  with its reason and is acked in the same transaction, so it can never crash consumers in a loop. A
  poison message's end is recorded like any other (status "dead", a ``done`` entry for the archive), so
  it is on record and replayable with ``llmq-stage dlq replay``.
- ``renew``: the owner of a slow entry resets its idle time (XCLAIM … JUSTID, which does not count a
  delivery) so XAUTOCLAIM never steals live work; only entries it still owns (checked atomically).
- ``forget_dead_consumers``: XGROUP DELCONSUMER orphans pending entries, so only consumers with
  nothing pending and no live lease are removed.
"""

from __future__ import annotations

import logging
import time

import msgspec
import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline

from pipeline import metrics
from pipeline.keys import Keys
from pipeline.lua import Lua
from pipeline.models import FIELD, Outcome, Status, decode_message
from pipeline.outcomes import announce, record_outcome
from pipeline.streams import Entry, as_str, parse_entries

log = logging.getLogger("llmq.reclaim")

# KEYS[1] stream; ARGV[1] group, ARGV[2] consumer, ARGV[3..] entry ids. Returns the ids not renewed
# because another consumer owns them now (or they are no longer pending).
_RENEW = """
local lost = {}
for i = 3, #ARGV do
  local id = ARGV[i]
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)
  if p[1] and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id, 'JUSTID')
  else
    table.insert(lost, id)
  end
end
return lost
"""


class Reclaimer:
    def __init__(
        self,
        *,
        redis: aioredis.Redis,
        keys: Keys,
        stream: str,
        group: str,
        consumer: str,
        claim_timeout_s: float,
        max_deliveries: int,
        result_retention_s: float,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.stream = stream
        self.group = group
        self.consumer = consumer
        self.claim_timeout_ms = int(claim_timeout_s * 1000)
        self.max_deliveries = max_deliveries
        self.result_retention_s = result_retention_s
        self._renew = Lua(redis, _RENEW)

    async def claim(self, count: int) -> list[Entry]:
        """Claim up to ``count`` entries idle past the claim timeout; poison ones are dead-lettered."""
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
            claimed.extend(e for e in parse_entries(reply[1]) if e.data)
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
        return await self.drop_poison(claimed)

    async def drop_poison(self, entries: list[Entry]) -> list[Entry]:
        """Dead-letter and ack the entries delivered more than ``max_deliveries`` times; return the rest."""
        pipe = self.redis.pipeline(transaction=False)
        for e in entries:
            pipe.xpending_range(self.stream, self.group, e.id, e.id, 1, consumername=self.consumer)
        rows = await pipe.execute()
        keep: list[Entry] = []
        poison: list[tuple[Entry, int]] = []
        for e, row in zip(entries, rows, strict=True):
            deliveries = int(row[0]["times_delivered"]) if row else 0
            if not row:
                continue  # no longer ours: acked or claimed by someone else meanwhile
            if deliveries > self.max_deliveries:
                poison.append((e, deliveries))
            else:
                keep.append(e)
        if poison:
            tx = self.redis.pipeline(transaction=True)
            finished: list[str] = []
            for e, deliveries in poison:
                reason = f"delivered {deliveries} times (max_deliveries {self.max_deliveries})"
                tx.xadd(
                    self.keys.dlq,
                    {
                        FIELD: e.data,
                        b"reason": reason,
                        b"stream": self.stream,
                        b"group": self.group,
                        b"entry_id": e.id,
                        b"deliveries": str(deliveries),
                        b"at": f"{time.time():.3f}",
                    },
                )
                if self.stream != self.keys.done:  # the archive's own input holds outcomes, not messages
                    self._record_dead(tx, e, reason, finished)
            announce(tx, self.keys, finished)
            tx.xack(self.stream, self.group, *(e.id for e, _ in poison))
            await tx.execute()
            metrics.POISON.labels(stage=self.group).inc(len(poison))
            log.error(
                "dead-lettered %d poison entries",
                len(poison),
                extra={"stage": self.group, "entry_ids": [e.id for e, _ in poison]},
            )
        return keep

    def _record_dead(self, tx: Pipeline, entry: Entry, reason: str, finished: list[str]) -> None:
        try:
            msg = decode_message(entry.data)
        except msgspec.DecodeError:  # not a message at all: the dead letter is its only record
            return
        outcome = Outcome(message=msg, status=Status.DEAD, error=f"poison: {reason}", finished_at=time.time())
        record_outcome(tx, self.keys, outcome, retention_s=self.result_retention_s, finished=finished)

    async def renew(self, entry_ids: list[str]) -> set[str]:
        """Reset the idle time of entries this consumer still owns; return the ids it no longer owns."""
        lost = await self._renew([self.stream], [self.group, self.consumer, *entry_ids])
        lost_ids = {as_str(x) for x in lost}
        if lost_ids:
            metrics.LEASES_LOST.labels(stage=self.group).inc(len(lost_ids))
        return lost_ids

    async def forget_dead_consumers(self) -> list[str]:
        """Delete consumers that have nothing pending, no live lease and have been idle a claim timeout."""
        forgotten = []
        for info in await self.redis.xinfo_consumers(self.stream, self.group):
            name = as_str(info["name"])
            if name == self.consumer or int(info["pending"]) or int(info["idle"]) < self.claim_timeout_ms:
                continue
            if await self.redis.exists(self.keys.consumer_lease(self.group, name)):
                continue
            await self.redis.xgroup_delconsumer(self.stream, self.group, name)
            forgotten.append(name)
        if forgotten:
            log.info("removed dead consumers", extra={"stage": self.group, "consumers": forgotten})
        return forgotten
