"""dispatch: send each admitted message to an OpenAI-compatible backend and record the outcome.

Up to ``queue.worker.max_concurrent`` calls per process, each backend's ``max_concurrent`` and rpm/tpm
across all processes (``llmq.pipeline.limits``), only backends that serve the requested model, balanced by
``loadbalancer.algorithm`` with optional session affinity, a circuit per backend and health probes.
Outcomes: success -> ``done`` (completed); timeout, connection error, 408/409/429/5xx -> ``retry``; other
4xx -> ``done`` (failed). Each entry commits as soon as its call ends.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import httpx
import msgspec
import redis.asyncio as aioredis
from prometheus_client import Counter, Gauge, Histogram

from llmq.pipeline import effects, tasks
from llmq.pipeline.backend_calls import CallResult, classify, clean_text, estimate_tokens, storable, token_count
from llmq.pipeline.balance import BackendView, Balancer, Circuit
from llmq.pipeline.config import BackendConfig, Config
from llmq.pipeline.echo import ECHO_SCHEME, completion
from llmq.pipeline.errors import GiveBack
from llmq.pipeline.http_pool import ShardedClient
from llmq.pipeline.keys import Keys
from llmq.pipeline.limits import BackendLimits
from llmq.pipeline.lua import Lua, script_source
from llmq.pipeline.models import Message, Outcome, Status, decode_message, encode
from llmq.pipeline.outcomes import outcome_effect
from llmq.pipeline.redis import UNAVAILABLE
from llmq.pipeline.stage import Batch, Stage
from llmq.pipeline.streams import Entry

log = logging.getLogger("llmq.dispatch")

DISPATCHED = Counter("llmq_dispatch_total", "Backend calls by outcome", ["backend", "outcome"])
DURATION = Histogram(
    "llmq_dispatch_duration_seconds",
    "Backend call duration",
    ["backend"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
BACKEND_UP = Gauge("llmq_backend_up", "1 when the backend's circuit is closed", ["backend"])
BACKEND_INFLIGHT = Gauge("llmq_backend_inflight", "Calls this process has running on the backend", ["backend"])
TOKENS = Counter("llmq_tokens_total", "Tokens reported by backends", ["backend", "kind"])

WAIT_FOR_SLOT_S = 0.01
LOST = "lost"
"""What the begin script says of a message whose entry another consumer owns now."""
_json = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class Held:
    """A backend slot a message holds: its backend, and when it was counted in that minute's rpm and tpm
    (None when it was held already, and counted before)."""

    backend: str
    counted_at: float | None


class _Meters:
    """One backend's labelled metric children, looked up once: labels() costs about 2 µs a call, and a
    call used six."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.inflight = BACKEND_INFLIGHT.labels(backend=backend)
        self.duration = DURATION.labels(backend=backend)
        self.prompt_tokens = TOKENS.labels(backend=backend, kind="prompt")
        self.completion_tokens = TOKENS.labels(backend=backend, kind="completion")
        self._outcomes: dict[Status, Counter] = {}

    def outcome(self, status: Status) -> Counter:
        if status not in self._outcomes:  # only the outcomes that happen get a series
            self._outcomes[status] = DISPATCHED.labels(backend=self.backend, outcome=status.value)
        return self._outcomes[status]


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
        self.name = "dispatch"
        self.stream = keys.dispatch
        self.config = config
        self.redis = redis
        self.keys = keys
        self.max_in_hand: int = config.queue.worker.max_concurrent
        self.backends = {b.name: b for b in config.backends}
        lb = config.loadbalancer
        self.circuits = {b.name: Circuit(max_failures=lb.max_failures) for b in config.backends}
        self.balancer = Balancer(lb.algorithm)
        self.timeout_s = config.scheduler.timeout.seconds
        self.limits = BackendLimits(redis=redis, keys=keys, lease_s=self.timeout_s + 5)
        self.max_retry_after_s = config.queue.retry.max_backoff.seconds
        claim_timeout_s = config.queue.worker.claim_timeout.seconds
        self.inflight_lease_s = self.timeout_s + claim_timeout_s
        """As the scheduler leases an admitted message's in-flight slot: renewed while this process holds it."""
        self.renew_every_s = claim_timeout_s / 3
        self.held: dict[str, str] = {}
        """Message id -> level of every message this process holds (waiting for a slot, or in a call)."""
        self._renewer: asyncio.Task[None] | None = None
        self.retention_s = config.queue.result_retention.seconds
        self.local_inflight = dict.fromkeys(self.backends, 0)
        self.meters = {name: _Meters(name) for name in self.backends}
        self.http: ShardedClient | None = None
        self._probe: asyncio.Task[None] | None = None
        self._begin = Lua(redis, script_source("begin"))
        self._stopping = asyncio.Event()

    async def start(self) -> None:
        self.http = ShardedClient(
            concurrency=self.max_in_hand, timeout=httpx.Timeout(self.timeout_s, connect=min(5.0, self.timeout_s))
        )
        for name in self.backends:
            BACKEND_UP.labels(backend=name).set(1)
        self._probe = asyncio.create_task(self._probe_loop(), name="health-probe")
        self._renewer = asyncio.create_task(self._renew_loop(), name="inflight-renew")

    async def close(self) -> None:
        await tasks.cancel(self._probe)
        await tasks.cancel(self._renewer)
        if self.http:
            await self.http.aclose()

    async def health(self) -> dict[str, str]:
        if not self.backends:
            return {"backends": "down"}
        now = time.time()
        usable = sum(c.usable(now) for c in self.circuits.values())
        return {"backends": "ok" if usable == len(self.circuits) else "degraded" if usable else "down"}

    async def handle(self, batch: Batch) -> None:
        """Idempotent on redelivery: a message whose status is already terminal is not sent again."""
        messages = [decode_message(entry.data) for entry in batch.entries]
        tokens = [estimate_tokens(m.request) for m in messages]  # for the tpm limits of begin and _call alike
        started = time.time()
        before, took = await self._begin_batch(batch, messages, tokens, started)
        results = await asyncio.gather(
            *(
                self._one(batch, entry, msg, raw.decode(), started, held, estimate)
                for entry, msg, raw, held, estimate in zip(batch.entries, messages, before, took, tokens, strict=True)
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
    ) -> tuple[list[bytes], list[Held | None]]:
        """Run the begin script (``scripts/begin.lua``): each message's status before ("lost" when its entry
        is no longer this consumer's), and the backend whose slot it holds.

        A message whose backends the process can order alone (every algorithm but least_connections, no
        session affinity) gets its slot here, in the batch's one round trip; the others, and those whose
        backends were all at a limit, take theirs in ``_call``."""
        order: dict[str, int] = {}
        per_message: list[Any] = []
        for entry, msg, estimate in zip(batch.entries, messages, tokens, strict=True):
            names = self._local_preference(msg)
            per_message += [msg.id, entry.id, estimate, len(names)]
            per_message += [order.setdefault(name, len(order) + 1) for name in names]
        keys = [self.keys.dispatch, *(self.keys.msg(m.id) for m in messages)]
        # Ownership is checked only where another consumer could have taken an entry over: checking every
        # fresh batch cost 5% end to end (an XPENDING per message on the busiest Redis path).
        consumer = "" if batch.owned_for_sure else batch.consumer
        args: list[Any] = [now, now + self.limits.lease_s, len(messages), len(order), batch.group, consumer]
        for name in order:
            backend = self.backends[name]
            keys += self.limits.keys_of(name, now)
            args += [backend.max_concurrent, backend.rpm or 0, backend.tpm or 0]
        reply = await self._begin(keys, args + per_message)
        by_number: list[str] = ["", *order]
        held = [Held(by_number[abs(int(j))], now if int(j) > 0 else None) if int(j) else None for j in reply[1::2]]
        return reply[0::2], held

    def _local_preference(self, msg: Message) -> list[str]:
        """Backends in order of preference when this process can tell alone, else none."""
        lb = self.config.loadbalancer
        if self.balancer.algorithm == "least_connections" or (msg.session_id and lb.enable_session_affinity):
            return []
        eligible = self._eligible(msg.request.get("model"))
        return self._ordered(eligible, msg, dict.fromkeys((b.name for b in eligible), 0))

    async def _one(
        self,
        batch: Batch,
        entry: Entry,
        msg: Message,
        before: str,
        started: float,
        held: Held | None,
        tokens: int,
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
            batch.ack(entry, effects.zrem(self.keys.inflight(msg.level), msg.id))
        else:
            msg.attempts += 1
            self.held[msg.id] = msg.level
            try:
                result = await self._call(batch, entry, msg, held, tokens)
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
        self, batch: Batch, entry: Entry, msg: Message, held: Held | None, tokens: int
    ) -> CallResult | None:
        """Send ``msg`` (estimated at ``tokens``) to the backend whose slot it holds, or to the first usable one
        with a free slot. None when, after waiting long for a slot, its entry turned out another consumer's."""
        model = msg.request.get("model")
        if held is not None:
            return await self._send(batch, self.backends[held.backend], msg, tokens, held.counted_at)
        if not any(not b.models or model in b.models for b in self.backends.values()):
            return CallResult(status=Status.FAILED, backend="-", error=f"no backend serves model {model!r}")
        waiting_since = time.monotonic()
        while True:
            eligible = self._eligible(model)
            if not eligible:
                return CallResult(status=Status.RETRYING, backend="-", error=f"every backend for {model!r} is down")
            for name in await self._preference(eligible, msg):
                backend = self.backends[name]
                now = time.time()
                got = await self.limits.acquire(
                    name,
                    msg.id,
                    max_concurrent=backend.max_concurrent,
                    rpm=backend.rpm,
                    tpm=backend.tpm,
                    tokens=tokens,
                    now=now,
                )
                if got and time.monotonic() - waiting_since > self.renew_every_s and not await self._owns(batch, entry):
                    batch.also(self.limits.free(name, msg.id))
                    return None
                if got:
                    return await self._send(batch, backend, msg, tokens, now if got == 1 else None)
            # Every usable backend is at its limit (slots, rpm or tpm). Shutting down, a call that has not
            # started is given back: its entry stays pending for this consumer's restart or another's claim.
            if await tasks.wait_event(self._stopping, WAIT_FOR_SLOT_S):
                raise GiveBack
            if msg.deadline is not None and time.time() > msg.deadline:
                error = "expired waiting for a backend slot (rpm, tpm or max_concurrent)"
                return CallResult(status=Status.EXPIRED, backend="-", error=error)

    async def _owns(self, batch: Batch, entry: Entry) -> bool:
        """Whether this consumer still owns the entry: after a wait longer than a lease renewal, another one may
        have taken it over (its lease lapsed while this one could not reach Redis)."""
        rows: Any = await self.redis.xpending_range(
            self.keys.dispatch, batch.group, min=entry.id, max=entry.id, count=1, consumername=batch.consumer
        )
        return bool(rows)

    def _eligible(self, model: object) -> list[BackendConfig]:
        now = time.time()
        return [
            b
            for b in self.backends.values()
            if self.circuits[b.name].usable(now) and (not b.models or model in b.models)
        ]

    async def _preference(self, eligible: list[BackendConfig], msg: Message) -> list[str]:
        # Only least_connections looks at in-flight counts: spare the others that round trip per call.
        if self.balancer.algorithm == "least_connections":
            inflight = await self.limits.inflight([b.name for b in eligible])
        else:
            inflight = dict.fromkeys((b.name for b in eligible), 0)
        order = self._ordered(eligible, msg, inflight)
        lb = self.config.loadbalancer
        if msg.session_id and lb.enable_session_affinity:
            key = self.keys.affinity(msg.session_id)
            ttl = max(1, int(lb.session_timeout.seconds))
            # Pin atomically (SET NX GET), so concurrent first messages of a session agree on one backend.
            previous: bytes | None = await self.redis.set(key, order[0], nx=True, get=True, ex=ttl)  # type: ignore[assignment]
            name = previous.decode() if previous else order[0]
            if name not in order or (name == msg.failed_backend and len(order) > 1):
                # its backend is down, cannot take this model, or just failed this message: re-pin
                name = order[0]
                await self.redis.set(key, name, ex=ttl)
            elif previous:
                await self.redis.expire(key, ttl)
            # Hard affinity: while its backend is up, a session waits for a slot there (its KV cache).
            order = [name]
        return order

    def _ordered(self, eligible: list[BackendConfig], msg: Message, inflight: dict[str, int]) -> list[str]:
        order = self.balancer.order([BackendView(b.name, b.weight, inflight[b.name]) for b in eligible])
        if msg.failed_backend in order and len(order) > 1:
            # Retry elsewhere: a backend that just failed or hung on this message is the last resort.
            order.remove(msg.failed_backend)
            order.append(msg.failed_backend)
        return order

    async def _send(
        self, batch: Batch, backend: BackendConfig, msg: Message, tokens: int, acquired_at: float | None
    ) -> CallResult:
        assert self.http is not None
        headers = {"X-LLMQ-Message-Id": msg.id}
        if backend.api_key_env and os.environ.get(backend.api_key_env):
            headers["Authorization"] = f"Bearer {os.environ[backend.api_key_env]}"
        meters = self.meters[backend.name]
        self.local_inflight[backend.name] += 1
        meters.inflight.set(self.local_inflight[backend.name])
        started = time.perf_counter()
        try:
            if backend.url.startswith(ECHO_SCHEME):
                body = completion(msg.request, name=backend.name, default_model="echo")
                result = CallResult(status=Status.COMPLETED, backend=backend.name, response=body)
            else:
                # scheduler.timeout bounds the whole call: httpx's timeouts are per read, so a backend that
                # trickles its answer would hold the call (and its backend slot, past its lease) for longer.
                async with self.http.client() as http, asyncio.timeout(self.timeout_s):
                    response = await http.post(
                        backend.url.rstrip("/") + "/chat/completions",
                        content=_json.encode(msg.request),
                        headers=headers,
                    )
                result = self._read(backend.name, response)
            if result.response is not None:
                result.tokens_used = self._count_tokens(backend.name, result.response)
        except (TimeoutError, httpx.TimeoutException):
            result = CallResult(
                status=Status.RETRYING, backend=backend.name, error=f"timeout after {self.timeout_s:g}s"
            )
        except httpx.HTTPError as exc:
            result = CallResult(status=Status.RETRYING, backend=backend.name, error=f"connection error: {exc!r}")
        finally:
            self.local_inflight[backend.name] -= 1
            meters.inflight.set(self.local_inflight[backend.name])
            meters.duration.observe(time.perf_counter() - started)
            # The slot is freed with the outcome's commit, which follows at once (the lease expires anyway)
            batch.also(self.limits.free(backend.name, msg.id))
        result.acquired_at = acquired_at
        self._update_circuit(backend.name, result)
        meters.outcome(result.status).inc()
        return result

    def _read(self, name: str, response: httpx.Response) -> CallResult:
        """What the backend's answer means. Once a call has been made, nothing it answered may leave the
        message to be called again: an answer that breaks the reading fails the message, with the reason."""
        try:
            return classify(name, response, max_retry_after_s=self.max_retry_after_s)
        except Exception as exc:
            log.warning("backend %s answered what cannot be read", name, exc_info=True)
            error = (
                f"backend {name} answered {response.status_code} with a body that cannot be read: {type(exc).__name__}"
            )
            return CallResult(status=Status.FAILED, backend=name, error=error)

    def _count_tokens(self, name: str, body: dict[str, Any]) -> int | None:
        """Count what ``usage`` reports (a number that is not a token count, negative say, is ignored) and
        return its total."""
        usage = body.get("usage") if isinstance(body, dict) else None
        if not isinstance(usage, dict):
            return None
        prompt, completion = token_count(usage.get("prompt_tokens")), token_count(usage.get("completion_tokens"))
        if prompt is not None:
            self.meters[name].prompt_tokens.inc(prompt)
        if completion is not None:
            self.meters[name].completion_tokens.inc(completion)
        return token_count(usage.get("total_tokens"))

    def _update_circuit(self, name: str, result: CallResult) -> None:
        circuit = self.circuits[name]
        if result.status is Status.COMPLETED or result.status is Status.FAILED:
            circuit.success()  # a 4xx is the request's fault, not the backend's
        elif result.retry_after is not None:
            circuit.cool(time.time() + result.retry_after)
        elif circuit.failure():
            BACKEND_UP.labels(backend=name).set(0)
            log.warning("backend %s taken out after %d consecutive failures", name, circuit.failures)

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
        if result.status is Status.RETRYING:
            msg.errors = [*msg.errors, f"attempt {msg.attempts}: {clean_text(result.error or '')}"]
            msg.retry_after = result.retry_after
            msg.failed_backend = result.backend if backend else None
            batch.ack(
                entry,
                effects.xadd(self.keys.retry, encode(msg)),
                effects.status(self.keys.msg(msg.id), Status.RETRYING, attempts=msg.attempts, error=result.error or ""),
                effects.zrem(self.keys.inflight(msg.level), msg.id),
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
            finished_at=now,
            prompt_tokens=token_count(usage.get("prompt_tokens")),
            completion_tokens=token_count(usage.get("completion_tokens")),
        )
        self._finish(batch, entry, outcome, *correction)

    def _finish(self, batch: Batch, entry: Entry, outcome: Outcome, *more: effects.Effect) -> None:
        try:
            effect = outcome_effect(self.keys, outcome, retention_s=self.retention_s)
        except (UnicodeEncodeError, OverflowError, msgspec.EncodeError, RecursionError):
            # A backend answer that parsed but cannot be stored (a lone surrogate, an integer past 64 bits):
            # recorded as it can be, never left to be called again.
            try:
                effect = outcome_effect(self.keys, _storable(outcome), retention_s=self.retention_s)
            except Exception:  # nothing it answered may leave the message to be called again
                error = f"backend {outcome.backend} answered a body that cannot be stored"
                bare = msgspec.structs.replace(outcome, status=Status.FAILED, response=None, error=error)
                effect = outcome_effect(self.keys, bare, retention_s=self.retention_s)
        batch.ack(entry, effect, *more)

    async def _renew_loop(self) -> None:
        """Keep the in-flight slots of held messages leased while they wait for a backend slot (rpm, tpm) or
        in a slow call: an expired lease would let the scheduler admit more than the backends can run."""
        while True:
            await asyncio.sleep(self.renew_every_s)
            if not self.held:
                continue
            expiry = time.time() + self.inflight_lease_s
            pipe = self.redis.pipeline(transaction=False)
            for message_id, level in self.held.items():
                pipe.zadd(self.keys.inflight(level), {message_id: expiry}, xx=True, gt=True)
            try:
                await pipe.execute()
            except UNAVAILABLE as exc:
                log.warning("could not renew in-flight leases: %s", exc)
            except Exception:  # a loop boundary: leases must go on being renewed
                log.error("renewing in-flight leases failed", exc_info=True)

    async def _probe_loop(self) -> None:
        interval = self.config.loadbalancer.health_check_interval.seconds
        while True:
            await asyncio.sleep(interval)
            for name, circuit in self.circuits.items():
                if not circuit.open:
                    continue
                try:
                    healthy = await self._probe_one(self.backends[name])
                except Exception:  # a loop boundary: a backend must not stay out because a probe broke
                    log.error("probing backend %s failed", name, exc_info=True)
                    continue
                if circuit.probe(healthy):
                    BACKEND_UP.labels(backend=name).set(1)
                    log.info("backend %s probed healthy: back in (half-open)", name)

    async def _probe_one(self, backend: BackendConfig) -> bool:
        assert self.http is not None
        if backend.url.startswith(ECHO_SCHEME):
            return True
        try:
            async with self.http.client() as http:
                response = await http.get(backend.url.rstrip("/") + "/models", timeout=5.0)
        except httpx.HTTPError:
            return False
        return response.is_success
