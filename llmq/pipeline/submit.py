"""Putting messages into their level stream: backpressure, idempotency, XADD and the status hash at once.

A Lua script (``scripts/submit.lua``) decides and writes each message atomically (a batch, up to
``PER_CALL`` messages per call), so concurrent duplicates of one idempotency key create one message, and a
full level writes nothing. The script is safe to repeat (a message whose id is queued already is not queued
again), so a submission is retried while Redis is unreachable, briefly, before the client hears 503.

An idempotency key belongs to whoever sent it: the record is keyed by the caller's API key, the tenant and
the key, and holds a digest of the request, so another caller's key never returns this one's message and
a key reused with a different request is a conflict (as Stripe answers). A level's depth is lag + pending
of the ``schedule`` group (what waits for admission), not XLEN, which also counts acked entries not yet
trimmed. A tenant's quotas (``max_queued``, ``rpm``, ``tpm``) are checked by the same script, with the
message: one over a quota is refused (``Verdict.LIMITED``) and counts toward nothing.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import time
from dataclasses import dataclass
from typing import Any

import msgspec
import redis.asyncio as aioredis

from llmq.pipeline.backoff import Backoff
from llmq.pipeline.config import Config
from llmq.pipeline.keys import Keys
from llmq.pipeline.lua import Coalesced, Lua
from llmq.pipeline.metrics import QUEUE_WAIT, SCHEDULED
from llmq.pipeline.models import Message
from llmq.pipeline.redis import UNAVAILABLE
from llmq.pipeline.runtime.streams import as_str
from llmq.pipeline.streamed import is_streamed
from llmq.pipeline.tokens import estimate_tokens
from llmq.pipeline.transitions import UNENDED_TTL_S

IDEMPOTENCY_TTL_S = 24 * 3600
PER_CALL = 100
"""Messages of a batch per submit script call. One call per message made Valkey run the script's set-up
and read the level's depth (XINFO GROUPS) for each; a call holds Valkey for about 0.4 ms per 100."""
RETRY_FOR_S = 2.0
"""How long a submission is retried while Redis is unreachable before the caller hears of it."""


class Verdict(enum.Enum):
    QUEUED = "queued"
    DUPLICATE = "duplicate"
    CONFLICT = "conflict"
    FULL = "full"
    LIMITED = "limited"
    """Its tenant is over a quota."""


@dataclass(frozen=True, slots=True)
class Submitted:
    verdict: Verdict
    message_id: str | None
    depth: int | None = None
    """Messages waiting in the level before this one (its position; None when unknown), or the depth that
    made it full."""
    admitted: bool = False
    """It was admitted at once (``scheduler.direct_admission``): it is on its way to a backend."""
    quota: Quota | None = None
    """The quota its tenant is over (``Verdict.LIMITED``)."""


@dataclass(frozen=True, slots=True)
class Quota:
    """A tenant's quota that refused a message."""

    name: str
    """``max_queued``, ``rpm`` or ``tpm``: the field of ``tenants[]`` (or ``tenant_defaults``)."""
    limit: int
    retry_after_s: int
    """When the message would be accepted (rates), or 1 (``max_queued``: when one of the tenant's ends)."""
    figure: int
    """Its open messages (``max_queued``), or the limit itself."""

    def describe(self, tenant: str | None) -> str:
        if self.name == "max_queued":
            return f"{_who(tenant)} has {self.figure} messages queued or running, its max_queued of {self.limit}"
        unit = "messages" if self.name == "rpm" else "estimated tokens"
        return f"{_who(tenant)} is over its {self.name} of {self.limit} {unit} a minute"


def _who(tenant: str | None) -> str:
    return "the unnamed tenant" if tenant is None else f"tenant {tenant!r}"


def over_tpm(config: Config, msg: Message) -> str | None:
    """Why a message can never pass its tenant's tpm (its estimate alone is more), or None."""
    tpm = config.tenant(msg.tenant).tpm
    tokens = estimate_tokens(msg.request, msg.endpoint) if tpm else 0
    if tpm and tokens > tpm:
        return (
            f"the request's estimate of {tokens} tokens (prompt characters / 4 + max_tokens) is more than "
            f"{_who(msg.tenant)}'s tpm of {tpm}: lower max_tokens or the prompt"
        )
    return None


@dataclass(frozen=True, slots=True)
class Submission:
    message: Message
    payload: bytes
    """The message's encoding."""
    caller: str = ""
    """Who sent it (a digest of the API key; "" without keys): idempotency keys are the caller's own."""
    digest: str = ""
    """Of the request as the client sent it (``request_digest``), when it has an idempotency key."""


def idempotency_record(keys: Keys, caller: str, tenant: str | None, idempotency_key: str) -> str:
    """The key of an idempotency record: the caller's own, per tenant (each part kept apart, so no tenant
    and key can be read as another pair)."""
    return keys.idem(msgspec.json.encode([caller, tenant or "", idempotency_key]).decode())


def legacy_record(keys: Keys, caller: str, idempotency_key: str) -> str | None:
    """The record the release before scoped keys kept for a key (one for every caller): honoured for the 24 h
    its records live after an upgrade, so a client that retries across it gets its first message. Only where
    the API has no keys: there every caller was the same one; with keys the record cannot be attributed.
    None otherwise."""
    return keys.legacy_idem(idempotency_key) if caller == "" else None


def request_digest(doc: Any) -> str:
    """A digest of a request that does not depend on the order of its keys, nor on how a whole number was
    written (``1`` or ``1.0``). ValueError when it nests too deeply to be read so."""
    try:
        return hashlib.sha256(msgspec.json.encode(_canonical(doc), order="sorted")).hexdigest()[:32]
    except RecursionError:
        raise ValueError("nested too deeply for an idempotency key") from None


def _canonical(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    if isinstance(value, msgspec.Struct):
        return _canonical(msgspec.structs.asdict(value))
    return value


class Submitter:
    def __init__(self, config: Config, *, redis: aioredis.Redis, keys: Keys) -> None:
        self.config = config
        self.redis = redis
        self.keys = keys
        self._script = Lua(redis, "submit")
        self._one = Coalesced(self._script)
        self._cancel = Lua(redis, "cancel")
        self.max_size = {lv.name: config.queue.max_size(lv) for lv in config.queue.levels}
        """Each level's backpressure threshold: a submission past it is refused (full)."""
        levels = sorted(config.queue.levels, key=lambda lv: lv.priority)
        # Not for the levels the scheduler staggers: it learns the spacing from the calls it admitted itself;
        # nor with a backend whose window or engine holds only the scheduler follows.
        direct = config.scheduler.direct_admission and not any(b.followed for b in config.backends)
        self._direct = {lv.name for lv in levels if direct and lv.name not in config.staggered}
        self._index = {lv.name: i + 1 for i, lv in enumerate(levels)}
        self._direct_keys = [keys.level(lv.name) for lv in levels] + [keys.inflight(lv.name) for lv in levels]
        self._direct_keys.append(keys.dispatch)
        self._levels_args: list[str | int] = [
            x for lv in levels for x in (lv.in_flight_cap, lv.reserved, lv.priority, lv.name)
        ]
        self._reserve_window_s = config.scheduler.reserve_window.seconds
        self._capacity = config.capacity
        self._lease_s = config.lease_s

    async def cancel(self, message_id: str, *, before: bool = True, abort: bool = False) -> str | None:
        """Cancel a message not yet dispatched (queued, scheduled or retrying) unless not ``before``, and with
        ``abort`` stop the backend call of one dispatched; return its status after."""
        args = [time.time(), self.keys.finished, int(before), int(abort)]
        status = await self._cancel([self.keys.msg(message_id)], args)
        return as_str(status) if status else None

    async def submit(self, sub: Submission) -> Submitted:
        """One script call; the submissions of concurrent requests share a round trip. With
        ``scheduler.direct_admission``, the script admits the message at once when nothing waits anywhere."""
        # (a tenant with max_in_flight is admitted by the scheduler alone, which counts it)
        direct = sub.message.level in self._direct and not self.config.tenant(sub.message.tenant).max_in_flight
        keys, args = self._call([sub], direct=direct)
        submitted = _verdict((await self._retrying(lambda: self._one(keys, args)))[0])
        if submitted.admitted:
            level = sub.message.level
            QUEUE_WAIT.labels(level=level).observe(max(0.0, time.time() - sub.message.enqueued_at))
            SCHEDULED.labels(level=level).inc()
        return submitted

    async def submit_many(self, subs: list[Submission]) -> list[Submitted]:
        """Each decided on its own, ``PER_CALL`` of them per script call (each call atomic), all in one round
        trip."""
        calls = [self._call(subs[i : i + PER_CALL]) for i in range(0, len(subs), PER_CALL)]
        verdicts: list[Submitted] = []
        for reply in await self._retrying(lambda: self._script.many(calls)) if calls else []:
            if isinstance(reply, Exception):
                raise reply
            verdicts += [_verdict(r) for r in reply]
        return verdicts

    async def _retrying(self, call: Any) -> Any:
        """``call()``, again while Redis is unreachable, for up to ``RETRY_FOR_S``: the script is safe to
        repeat, and a client told 503 cannot know whether its message was queued."""
        backoff = Backoff(initial_s=0.02, max_s=0.5)
        deadline = time.monotonic() + RETRY_FOR_S
        while True:
            try:
                return await call()
            except UNAVAILABLE:
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(backoff.next())

    def _call(
        self, subs: list[Submission], *, direct: bool = False
    ) -> tuple[list[str], list[str | bytes | int | float]]:
        keys: list[str] = []
        now = time.time()
        args: list[str | bytes | int | float] = [UNENDED_TTL_S, IDEMPOTENCY_TTL_S, len(subs), now if direct else ""]
        for sub in subs:
            msg = sub.message
            idem = msg.idempotency_key
            record = idempotency_record(self.keys, sub.caller, msg.tenant, idem) if idem else self.keys.idem("")
            legacy = (legacy_record(self.keys, sub.caller, idem) if idem else None) or record
            keys += [self.keys.level(msg.level), self.keys.msg(msg.id), record, legacy]
            keys += [self.keys.tenant_open(msg.tenant), self.keys.tenant_rate(msg.tenant)]
            # callers validate the level
            digest = (sub.digest or "-") if idem else ""
            streamed = "1" if is_streamed(msg) else ""
            args += [sub.payload, msg.id, msg.level, msg.enqueued_at, self.max_size[msg.level], digest, streamed]
            quotas = self.config.tenant(msg.tenant)
            tokens = estimate_tokens(msg.request, msg.endpoint) if quotas.tpm else 0
            args += [quotas.max_queued or "", quotas.rpm or "", quotas.tpm or "", tokens]
            args.append("1" if quotas.max_in_flight else "")
        if direct:
            keys += self._direct_keys
            level = self._index[subs[0].message.level]
            args += [now + self._lease_s, self._capacity, len(self._index), level, self._reserve_window_s]
            args += self._levels_args
        keys += [self.keys.paused, self.keys.active]
        return keys, args


def _verdict(reply: list[bytes | int]) -> Submitted:
    verdict = Verdict(as_str(reply[0]))
    if verdict is Verdict.LIMITED:
        quota = Quota(as_str(reply[1]), int(reply[3]), max(1, int(reply[2])), int(reply[4]))
        return Submitted(verdict, None, quota=quota)
    if verdict is Verdict.FULL:
        return Submitted(verdict, None, int(reply[1]))
    if verdict in (Verdict.DUPLICATE, Verdict.CONFLICT):
        return Submitted(verdict, as_str(reply[1]))
    depth = int(reply[2])
    return Submitted(verdict, as_str(reply[1]), depth if depth >= 0 else None, admitted=len(reply) > 3)


def new_message(
    *,
    message_id: str,
    level: str,
    request: dict[str, object],
    session_id: str | None = None,
    tenant: str | None = None,
    idempotency_key: str | None = None,
    deadline_ms: int | None = None,
    metadata: dict[str, object] | None = None,
    endpoint: str = "chat/completions",
) -> Message:
    now = time.time()
    return Message(
        id=message_id,
        level=level,
        request=request,
        session_id=session_id,
        tenant=tenant,
        idempotency_key=idempotency_key,
        enqueued_at=now,
        deadline=None if deadline_ms is None else now + deadline_ms / 1000,
        metadata=dict(metadata or {}),
        endpoint=endpoint,
    )
