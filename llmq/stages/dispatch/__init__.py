"""dispatch: send each admitted message to an OpenAI-compatible backend and record the outcome.

Up to ``queue.worker.max_concurrent`` calls per process; each entry commits as soon as its call ends.
Outcomes: success -> ``done`` (completed); timeout, connection error, 408/409/429/5xx -> ``retry``; other
4xx -> ``done`` (failed).

- ``routing``: the backends that serve the model and are usable, in the balancing order, with session
  affinity and a circuit per backend;
- ``limits``: each backend's concurrency and rpm/tpm, shared by every dispatcher through Redis;
- ``calls``: making a call and reading its answer;
- ``probes``: bringing a backend whose circuit opened back in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

import msgspec
import redis.asyncio as aioredis
from prometheus_client import Counter

from llmq.pipeline import background, circuits, inflight, transitions
from llmq.pipeline.config import Config
from llmq.pipeline.errors import GiveBack
from llmq.pipeline.keys import Group, Keys
from llmq.pipeline.lua import Lua
from llmq.pipeline.models import Message, Outcome, Status, decode_message, encode
from llmq.pipeline.redis import UNAVAILABLE
from llmq.pipeline.runtime import effects
from llmq.pipeline.runtime.batch import Batch
from llmq.pipeline.runtime.stage import Stage
from llmq.pipeline.runtime.streams import Entry
from llmq.pipeline.streamed import is_streamed
from llmq.pipeline.tokens import estimate_tokens
from llmq.pipeline.window import REFRESH_S, Windows
from llmq.stages.dispatch.calls import Caller, CallResult, clean_text, storable, token_count
from llmq.stages.dispatch.engines import Engines
from llmq.stages.dispatch.http_pool import Pool
from llmq.stages.dispatch.limits import BackendLimits
from llmq.stages.dispatch.probes import Prober
from llmq.stages.dispatch.routing import Router

log = logging.getLogger("llmq.dispatch")

WAIT_FOR_SLOT_S = 0.01
REFUSALS_WAITED = 3
"""Capacity refusals a message waits through in the dispatcher (for a slot under the cut window) before
its attempt is retried through the retry stage."""
REFUSED_AND_WAITED = Counter(
    "llmq_dispatch_refusals_waited_total", "Calls refused for capacity whose message waited here for another slot"
)
_json = msgspec.json.Encoder()
LOST = "lost"
"""What the begin script says of a message whose entry another consumer owns now."""


@dataclass(frozen=True, slots=True)
class Held:
    """A backend slot a message holds: its backend, and when it was counted in that minute's rpm and tpm
    (None when it was held already, and counted before)."""

    backend: str
    counted_at: float | None


def attempt_line(attempt: int, backend: str, at: float, error: str) -> str:
    """One line of a message's ``errors``: which attempt failed, on which backend, when (UTC), and why."""
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))
    where = "" if backend == "-" else f" on {backend}"  # "-": no backend was called
    return f"attempt {attempt}{where} at {when}: {clean_text(error)}"


def _storable(outcome: Outcome) -> Outcome:
    """``outcome`` with a response that can be stored: text with lone surrogates gets U+FFFD in their place;
    a response that still cannot be (an integer past 64 bits) makes the outcome failed, with the reason."""
    body, problem = storable(outcome.response)
    if problem is None:
        return msgspec.structs.replace(outcome, response=body)
    error = f"backend {outcome.backend} answered a body that cannot be stored: {problem}"
    return msgspec.structs.replace(outcome, status=Status.FAILED, response=None, error=error)


class Dispatch(Stage):
    def __init__(self, *, config: Config, redis: aioredis.Redis, keys: Keys) -> None:
        self.name = Group.DISPATCH.value
        self.stream = keys.dispatch
        self.config = config
        self.redis = redis
        self.keys = keys
        self.max_in_hand: int = config.queue.worker.in_hand
        self.timeout_s = config.scheduler.timeout.seconds
        self.limits = BackendLimits(redis=redis, keys=keys, lease_s=self.timeout_s + 5)
        self.router = Router(config, redis=redis, keys=keys, limits=self.limits)
        self.windows = Windows(config.backends, redis=redis, keys=keys)
        self.backends = self.router.backends
        claim_timeout_s = config.queue.worker.claim_timeout.seconds
        self.inflight_lease_s = self.timeout_s + claim_timeout_s
        """As the scheduler leases an admitted message's in-flight slot: renewed while this process holds it."""
        self.renew_every_s = claim_timeout_s / 3
        self.top = min(config.queue.levels, key=lambda lv: lv.priority).name if config.queue.levels else ""
        """The top-priority level: its calls may overcommit a backend that schedules by priority."""
        self.held: dict[str, str] = {}
        """Message id -> level of every message this process holds (waiting for a slot, or in a call)."""
        self.retention_s = config.queue.result_retention.seconds
        self.caller: Caller | None = None
        self.engines: Engines | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._begin = Lua(redis, "begin")
        self._stopping = asyncio.Event()
        self.process = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}"
        """Whose circuits these are, in ``llmq.pipeline.circuits``: this dispatcher's, whichever process runs it."""

    async def start(self) -> None:
        http = Pool(
            concurrency=self.max_in_hand, connect_timeout_s=min(5.0, self.timeout_s), read_timeout_s=self.timeout_s
        )
        self.caller = Caller(
            self.config, http=http, router=self.router, windows=self.windows, redis=self.redis, keys=self.keys
        )
        prober = Prober(self.config, router=self.router, http=http)
        self.engines = Engines(self.config.backends, redis=self.redis, keys=self.keys, http=http, windows=self.windows)
        self._tasks = [
            asyncio.create_task(prober.run(), name="health-probe"),
            asyncio.create_task(self._renew_loop(), name="inflight-renew"),
            asyncio.create_task(self._circuits_loop(), name="circuits"),
        ]
        if self.windows.adaptive:
            self._tasks.append(asyncio.create_task(self._windows_loop(), name="windows"))
        if self.engines.metered:
            self._tasks.append(asyncio.create_task(self.engines.run(), name="engine-metrics"))

    async def close(self) -> None:
        for task in self._tasks:
            await background.cancel(task)
        with contextlib.suppress(*UNAVAILABLE):  # else it goes stale, and the next writer deletes it
            pipe = self.redis.pipeline(transaction=False)
            for name in self.backends:
                pipe.hdel(self.keys.backend_circuits(name), self.process)
            await pipe.execute()
        if self.caller:
            await self.caller.http.aclose()

    async def health(self) -> dict[str, str]:
        return {"backends": self.router.health()}

    async def handle(self, batch: Batch) -> None:
        """Idempotent on redelivery: a message whose status is already terminal is not sent again."""
        messages = [decode_message(entry.data) for entry in batch.entries]
        # the estimates, for the tpm limits of begin and _call alike
        tokens = [estimate_tokens(m.request, m.endpoint) for m in messages]
        started = time.time()
        before, took, earlier = await self._begin_batch(batch, messages, tokens, started)
        results = await asyncio.gather(
            *(
                self._one(batch, entry, msg, raw.decode(), started, held, estimate, streamed)
                for entry, msg, raw, held, estimate, streamed in zip(
                    batch.entries, messages, before, took, tokens, earlier, strict=True
                )
            ),
            return_exceptions=True,
        )
        # Raised only once every call of the batch has ended and committed: a failure or a give-back of
        # one must not discard the transaction the others are still committing on.
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            # A failure outranks "Redis unavailable" (which the runner answers by handing the batch again in
            # this process), which outranks a give-back: a failed entry must be re-read, counting a delivery.
            raise min(errors, key=lambda e: 2 if isinstance(e, GiveBack) else 1 if isinstance(e, UNAVAILABLE) else 0)

    def on_stop(self) -> None:
        self._stopping.set()

    async def _begin_batch(
        self, batch: Batch, messages: list[Message], tokens: list[int], now: float
    ) -> tuple[list[bytes], list[Held | None], list[bool]]:
        """Run the begin script (``scripts/begin.lua``): each message's status before ("lost" when its entry
        is no longer this consumer's), the backend whose slot it holds, and whether it streams and its events
        stream holds an earlier attempt's entries.

        A message whose backends the process can order alone (every algorithm but least_connections, no
        session affinity) gets its slot here, in the batch's one round trip; the others, and those whose
        backends were all at a limit, take theirs in ``_call``."""
        order: dict[str, int] = {}
        per_message: list[Any] = []
        for entry, msg, estimate in zip(batch.entries, messages, tokens, strict=True):
            names = [n for n in self.router.local_preference(msg) if not self._held(n) and not self._over(msg, n)]
            per_message += [msg.id, entry.id, estimate, int(is_streamed(msg)), len(names)]
            per_message += [order.setdefault(name, len(order) + 1) for name in names]
        keys = [
            self.keys.dispatch,
            *(self.keys.msg(m.id) for m in messages),
            *(self.keys.events(m.id) for m in messages),
        ]
        # Ownership is checked only where another consumer could have taken an entry over: checking every
        # fresh batch cost 5% end to end (an XPENDING per message on the busiest Redis path).
        consumer = "" if batch.owned_for_sure else batch.consumer
        args: list[Any] = [now, now + self.limits.lease_s, len(messages), len(order), batch.group, consumer]
        for name in order:
            backend = self.backends[name]
            keys += self.limits.keys_of(name, now)
            args += [self.windows.slots(name), backend.rpm or 0, backend.tpm or 0]
        reply = await self._begin(keys, args + per_message)
        by_number: list[str] = ["", *order]
        held = [Held(by_number[abs(int(j))], now if int(j) > 0 else None) if int(j) else None for j in reply[1::3]]
        return reply[0::3], held, [e == 1 for e in reply[2::3]]

    async def _one(
        self,
        batch: Batch,
        entry: Entry,
        msg: Message,
        before: str,
        started: float,
        held: Held | None,
        tokens: int,
        streamed_before: bool,
    ) -> None:
        if before == LOST:
            # Another consumer took the entry over (this one's lease had lapsed): it is theirs to call.
            batch.settled(entry)
            return
        status = Status(before) if before else None
        if status is Status.CANCELLED:
            self._finish(batch, entry, Outcome(message=msg, status=Status.CANCELLED, finished_at=time.time()))
        elif status is not None and status.terminal:
            # a redelivery of a finished message: nothing to send
            batch.ack(entry, inflight.released(self.keys, msg.level, msg.id))
        else:
            msg.attempts += 1
            self.held[msg.id] = msg.level
            try:
                result = await self._call(batch, entry, msg, held, tokens, streamed_before)
                if result is None:  # taken over while it waited: the other consumer's to call now
                    batch.settled(entry)
                    return
                self._record(batch, entry, msg, result, started, tokens)
            except Exception:
                # The entry stays pending, but the backend slot that _send freed in its ``finally`` must not
                # wait for its lease: commit that now, as no sibling of the batch may commit after this.
                await batch.commit()
                raise
            finally:
                self.held.pop(msg.id, None)
        await batch.commit()

    async def _call(
        self, batch: Batch, entry: Entry, msg: Message, held: Held | None, tokens: int, streamed_before: bool
    ) -> CallResult | None:
        """Send ``msg`` (estimated at ``tokens``; ``streamed_before``: its events stream holds an earlier
        attempt's entries) to the backend whose slot it holds, or to the first usable one with a free slot.
        None when, after waiting long for a slot, its entry turned out another consumer's.

        An adaptive backend that refuses the call for capacity without asking for a pause (no Retry-After)
        has its window cut (``llmq.pipeline.window``): the message waits here for a slot again, up to
        ``REFUSALS_WAITED`` times, instead of going through the retry stage's backoff. It was never run, so
        it is no attempt; waiting in the retry stage would leave the backend idle while it waits."""
        refusals = 0
        while True:
            result = await self._call_once(batch, entry, msg, held, tokens, streamed_before)
            if (
                result is None
                or not (result.capacity and self.backends[result.backend].adaptive)
                or result.retry_after is not None
                or refusals == REFUSALS_WAITED
                or (msg.deadline is not None and time.time() > msg.deadline)
            ):
                return result
            refusals += 1
            REFUSED_AND_WAITED.inc()
            await batch.commit()  # frees the refused call's slot before this message takes one again
            await self.windows.settled(result.backend)  # and waits under the window its refusal cut
            held = None

    async def _call_once(
        self, batch: Batch, entry: Entry, msg: Message, held: Held | None, tokens: int, streamed_before: bool
    ) -> CallResult | None:
        assert self.caller is not None
        model = msg.request.get("model")
        if held is not None:
            free = self.limits.free(held.backend, msg.id)
            return await self.caller.send(
                batch,
                self.backends[held.backend],
                msg,
                free=free,
                acquired_at=held.counted_at,
                streamed_before=streamed_before,
            )
        if not self.router.serves(model):
            return CallResult(status=Status.FAILED, backend="-", error=f"no backend serves model {model!r}")
        waiting_since = time.monotonic()
        while True:
            eligible = self.router.eligible(model)
            if not eligible:
                return CallResult(status=Status.RETRYING, backend="-", error=f"every backend for {model!r} is down")
            for name in await self.router.preference(eligible, msg):
                if self._held(name):
                    continue  # its engine is behind: as if at its limit
                backend = self.backends[name]
                now = time.time()
                got = await self.limits.acquire(
                    name,
                    msg.id,
                    slots=self.windows.slots(name) + self._over(msg, name),
                    rpm=backend.rpm,
                    tpm=backend.tpm,
                    tokens=tokens,
                    now=now,
                )
                if got and time.monotonic() - waiting_since > self.renew_every_s and not await self._owns(batch, entry):
                    batch.also(self.limits.free(name, msg.id))
                    return None
                if got:
                    free = self.limits.free(name, msg.id)
                    counted_at = now if got == 1 else None
                    return await self.caller.send(
                        batch, backend, msg, free=free, acquired_at=counted_at, streamed_before=streamed_before
                    )
            # Every usable backend is at its limit (slots, rpm or tpm). Shutting down, a call that has not
            # started is given back: its entry stays pending for this consumer's restart or another's claim.
            if await background.wait_event(self._stopping, WAIT_FOR_SLOT_S):
                raise GiveBack
            if msg.deadline is not None and time.time() > msg.deadline:
                error = "expired waiting for a backend slot (rpm, tpm, max_concurrent, or an engine behind)"
                return CallResult(status=Status.EXPIRED, backend="-", error=error)

    def _over(self, msg: Message, name: str) -> int:
        """How many calls over ``name``'s slots ``msg`` may go (``overcommit``, for the top level only)."""
        return self.backends[name].overcommit if msg.level == self.top else 0

    def _held(self, name: str) -> bool:
        return self.engines is not None and self.engines.holding(name)

    async def _owns(self, batch: Batch, entry: Entry) -> bool:
        """Whether this consumer still owns the entry: after a wait longer than a lease renewal, another one may
        have taken it over (its lease lapsed while this one could not reach Redis)."""
        rows: Any = await self.redis.xpending_range(
            self.keys.dispatch, batch.group, min=entry.id, max=entry.id, count=1, consumername=batch.consumer
        )
        return bool(rows)

    def _record(
        self, batch: Batch, entry: Entry, msg: Message, result: CallResult, started: float, tokens: int
    ) -> None:
        now = time.time()
        backend = self.backends.get(result.backend)
        correction = (
            self.limits.correct(
                backend.name, tpm=backend.tpm, estimated=tokens, used=result.tokens_used, acquired_at=result.acquired_at
            )
            if backend
            else []
        )
        if result.status in (Status.RETRYING, Status.FAILED):
            # a failure at warning; an attempt to be retried at info (an outage would flood warnings)
            log.log(
                logging.INFO if result.status is Status.RETRYING else logging.WARNING,
                "message %s, attempt %d on backend %s: %s (%s)",
                msg.id,
                msg.attempts,
                result.backend,
                clean_text(result.error or "")[:200],
                "retried" if result.status is Status.RETRYING else "failed",
                extra={"message_id": msg.id, "backend": result.backend, "level_name": msg.level},
            )
        if result.status is Status.RETRYING:
            msg.errors = [*msg.errors, attempt_line(msg.attempts, result.backend, now, result.error or "")]
            msg.retry_after = result.retry_after
            msg.failed_backend = result.backend if backend else None
            batch.ack(
                entry,
                effects.xadd(self.keys.retry, encode(msg)),
                transitions.retrying(
                    self.keys, msg.id, attempts=msg.attempts, error=result.error or "", errors=_json.encode(msg.errors)
                ),
                inflight.released(self.keys, msg.level, msg.id),
                effects.publish(self.keys.slots, msg.level),
                *correction,
            )
            return
        usage = (result.response or {}).get("usage")
        usage = usage if isinstance(usage, dict) else {}
        outcome = Outcome(
            message=msg,
            status=result.status,
            backend=result.backend,
            response=result.response,
            error=result.error,
            started_at=started,
            first_token_ms=result.first_token_ms,
            finished_at=now,
            prompt_tokens=token_count(usage.get("prompt_tokens")),
            completion_tokens=token_count(usage.get("completion_tokens")),
        )
        self._finish(batch, entry, outcome, *correction)

    def _finish(self, batch: Batch, entry: Entry, outcome: Outcome, *more: effects.Effect) -> None:
        try:
            effect = transitions.ended(self.keys, outcome, retention_s=self.retention_s)
        except (UnicodeEncodeError, OverflowError, msgspec.EncodeError, RecursionError):
            # A backend answer that parsed but cannot be stored (a lone surrogate, an integer past 64 bits):
            # recorded as it can be, never left to be called again.
            try:
                effect = transitions.ended(self.keys, _storable(outcome), retention_s=self.retention_s)
            except Exception:  # nothing it answered may leave the message to be called again
                error = f"backend {outcome.backend} answered a body that cannot be stored"
                bare = msgspec.structs.replace(outcome, status=Status.FAILED, response=None, error=error)
                effect = transitions.ended(self.keys, bare, retention_s=self.retention_s)
        batch.ack(entry, effect, *more)

    async def _windows_loop(self) -> None:
        """Follow the adaptive windows the other dispatchers move (``llmq.pipeline.window``)."""
        while True:
            await asyncio.sleep(REFRESH_S)
            try:
                await self.windows.refresh()
            except UNAVAILABLE as exc:
                log.warning("could not read the backends' windows: %s", exc)
            except Exception:  # a loop boundary: the windows must go on being followed
                log.error("reading the backends' windows failed", exc_info=True)

    async def _circuits_loop(self) -> None:
        """Publish this process's circuits (``llmq.pipeline.circuits``) when one changes and every ``PUBLISH_S``."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.router.changed.wait(), circuits.PUBLISH_S)
            self.router.changed.clear()
            try:
                await circuits.publish(self.redis, self.keys, self.process, self.router.views())
            except UNAVAILABLE as exc:
                log.warning("could not publish the backends' circuits: %s", exc)
            except Exception:  # a loop boundary: the circuits must go on being published
                log.error("publishing the backends' circuits failed", exc_info=True)

    async def _renew_loop(self) -> None:
        """Keep the in-flight slots of held messages leased while they wait for a backend slot (rpm, tpm) or
        in a slow call: an expired lease would let the scheduler admit more than the backends can run."""
        while True:
            await asyncio.sleep(self.renew_every_s)
            if not self.held:
                continue
            expiry = time.time() + self.inflight_lease_s
            pipe = self.redis.pipeline(transaction=False)
            inflight.renew(pipe, self.keys, self.held, expiry)
            try:
                await pipe.execute()
            except UNAVAILABLE as exc:
                log.warning("could not renew in-flight leases: %s", exc)
            except Exception:  # a loop boundary: leases must go on being renewed
                log.error("renewing in-flight leases failed", exc_info=True)
