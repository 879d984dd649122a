"""The dispatch stage: routing (balancing, affinity, circuits), backend limits (slots, rpm, tpm), calls and
what their answers mean, on real Redis with mock backends over real HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from llmq.pipeline.keys import Keys
from llmq.pipeline.models import FIELD, Status, decode_outcome, encode, new_id
from llmq.pipeline.runtime.batch import Batch
from llmq.pipeline.runtime.effects import Commit
from llmq.pipeline.runtime.ops_server import OpsServer
from llmq.pipeline.runtime.streams import ensure_group, parse_entries
from llmq.pipeline.submit import new_message
from llmq.pipeline.tokens import MAX_ESTIMATE, estimate_tokens
from llmq.stages.dispatch import Dispatch, calls
from llmq.stages.dispatch.calls import classify, retry_after
from llmq.stages.dispatch.http_pool import Answer, HTTPError, Pool
from llmq.stages.dispatch.limits import BackendLimits
from llmq.stages.dispatch.routing import BackendView, Balancer, Circuit
from llmq.stages.mock_backend import MockBackend, MockSettings
from tests.conftest import eventually, free_port
from tests.support.harness import CHAT, Harness

NO_RETRY = {"LLMQ_QUEUE__RETRY__MAX_RETRIES": "0"}


async def _lease_beyond(redis: aioredis.Redis, keys: Keys, member: str, when: float) -> bool:
    score = await redis.zscore(keys.inflight("normal"), member)
    return score is not None and score > when


async def _clear_of_a_minute_boundary(margin_s: float) -> None:
    """rpm/tpm count per clock minute: a test that must stay inside one minute starts early enough in it."""
    into = time.time() % 60
    if into > 60 - margin_s:
        await asyncio.sleep(60 - into + 0.1)


async def _called(h: Harness) -> bool:
    return h.mocks["a"].calls > 0


async def _no_slot_taken(redis: aioredis.Redis, keys: Keys, backend: str) -> bool:
    return int(await redis.zcard(keys.backend_slots(backend))) == 0


async def _metrics(_: Harness) -> str:
    from prometheus_client import generate_latest

    return generate_latest().decode()


async def _backend_up(h: Harness, name: str) -> bool:
    return f'llmq_backend_up{{backend="{name}"}} 1.0' in await _metrics(h)


NOW = 1000.0


async def test_an_answer_with_lone_surrogates_completes_once_with_them_replaced(
    redis: aioredis.Redis, keys: Keys
) -> None:
    # Given a backend whose JSON answer holds an escaped lone surrogate (it parses, but cannot be stored)
    body = '{"choices": [{"message": {"role": "assistant", "content": "half \\ud83d of an emoji"}}]}'
    async with Harness(redis, keys, backends={"a": MockSettings(latency_ms=1, body=body)}) as h:
        mid = await h.submit()
        # When it is dispatched, then it completes after one call, the surrogate replaced
        status = (await h.wait_terminal([mid]))[mid]
        calls = h.mocks["a"].calls
    assert status["status"] == "completed" and calls == 1
    content = msgspec.json.decode(status["result"])["choices"][0]["message"]["content"]
    assert content == "half \ufffd of an emoji"


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        (
            '{"choices": [], "usage": {"prompt_tokens": 123456789012345678901234567890}}',
            "failed",
            "cannot be stored: an integer past 64 bits at usage.prompt_tokens",
        ),
        # the reason names a key with a lone surrogate: it must be storable itself
        ('{"\\udead": 123456789012345678901234567890}', "failed", "an integer past 64 bits at \ufffd"),
        # counts that are not token counts are not counted (a negative one broke the metric)
        ('{"choices": [], "usage": {"prompt_tokens": -1, "total_tokens": 9223372036854775807}}', "completed", None),
        # nested past what the standard parser takes: an invalid answer, retried on the backoff, not poison
        ("[" * 100_000 + "]" * 100_000, "dead", "backend answered invalid JSON"),
        # a lone surrogate nested deeper than cleaning it can go: failed, recorded as it can be
        ('{"a": ' + "[" * 600 + '"\\ud800"' + "]" * 600 + "}", "failed", "cannot be stored"),
    ],
)
async def test_an_answer_that_breaks_the_reading_ends_the_message_without_calling_again(
    redis: aioredis.Redis, keys: Keys, body: str, status: str, error: str | None
) -> None:
    # Given a backend whose answer parses but holds what cannot be stored or counted (tpm on, to correct it)
    backends = {"a": MockSettings(latency_ms=1, body=body)}
    config = {"a": {"max_concurrent": 8, "tpm": 100_000}}
    async with Harness(redis, keys, backends=backends, backend_config=config, env=NO_RETRY) as h:
        mid = await h.submit()
        # When it is dispatched, then it ends with the reason after one call (once per attempt), never poison
        result = (await h.wait_terminal([mid]))[mid]
        calls = h.mocks["a"].calls
    assert result["status"] == status and calls == 1, result
    if error is not None:
        assert error in result["error"]
    assert "poison" not in result.get("error", "")


async def test_scheduler_timeout_bounds_the_whole_call(redis: aioredis.Redis, keys: Keys) -> None:
    # Given a backend that answers within every read timeout but takes 3 s for the whole answer
    backend = MockSettings(latency_ms=1, trickle_s=3.0)
    env = {"LLMQ_SCHEDULER__TIMEOUT": "500ms", **NO_RETRY}
    async with Harness(redis, keys, backends={"a": backend}, env=env) as h:
        started = time.monotonic()
        mid = await h.submit()
        # When it is called, then the call ends at scheduler.timeout, not when the backend is done
        status = (await h.wait_terminal([mid], within=10))[mid]
        elapsed = time.monotonic() - started
    assert status["status"] == "dead" and "timeout after 0.5s" in status["error"]
    assert elapsed < 2.0, elapsed


async def test_dispatch_renews_the_in_flight_leases_of_what_it_holds(redis: aioredis.Redis, keys: Keys) -> None:
    # Given a dispatcher holding a message (waiting for a slot or in a long call) whose in-flight lease
    # would expire in half a second, and another message's lease it does not hold
    async with Harness(redis, keys, backends={"a": MockSettings()}, stages=("dispatch",)) as h:
        [dispatcher] = h.stages
        held, other = new_id(), new_id()
        soon = time.time() + 0.5
        await redis.zadd(keys.inflight("normal"), {held: soon, other: soon})
        dispatcher.held[held] = "normal"  # type: ignore[attr-defined]
        # When a renewal comes round (every third of the claim timeout: 2 s here)
        await asyncio.sleep(1.0)
        assert await redis.zscore(keys.inflight("normal"), held) is not None
        await eventually(lambda: _lease_beyond(redis, keys, held, soon + 1), within=3, what="the lease renewed")
    # Then the held one's lease was extended, the other left to expire
    assert await redis.zscore(keys.inflight("normal"), other) == pytest.approx(soon)


async def test_a_request_past_a_whole_minutes_tokens_runs_and_does_not_wedge_dispatch(
    redis: aioredis.Redis, keys: Keys
) -> None:
    # Given a backend with tpm 1000
    config = {"a": {"max_concurrent": 8, "tpm": 1000}}
    async with Harness(redis, keys, backends={"a": MockSettings(latency_ms=1)}, backend_config=config) as h:
        # When a request asks for up to 200,000 tokens (its estimate could never fit: it waited for good)
        big = await h.submit(request={**CHAT, "max_tokens": 200_000})
        # Then it runs, taking the minute's whole budget, which its usage (17 tokens) then gives back
        assert (await h.wait_terminal([big], within=10))[big]["status"] == "completed"
        after = await h.submit("realtime")
        assert (await h.wait_terminal([after], within=10))[after]["status"] == "completed"


def test_a_negative_or_absurd_budget_is_estimated_as_none_given() -> None:
    prompt = [{"role": "user", "content": "x" * 400}]
    assert estimate_tokens({"messages": prompt, "max_tokens": -100_000_000}) == 100 + 256
    assert estimate_tokens({"messages": prompt, "max_tokens": 10**30}) == MAX_ESTIMATE


async def test_a_tpm_correction_never_overflows_the_counter(redis: aioredis.Redis, keys: Keys) -> None:
    limits = BackendLimits(redis=redis, keys=keys, lease_s=1)
    [effect] = limits.correct("a", tpm=1000, estimated=5000, used=2**63 - 1, acquired_at=time.time())
    assert effect.args[0] == MAX_ESTIMATE - 1000  # what acquire counted was the whole minute, 1000


def test_an_error_body_in_any_charset_is_storable() -> None:
    # a 503 whose body says charset=utf-7: "+2AA-" decodes to a lone surrogate
    response = Answer(503, {"content-type": "text/plain; charset=utf-7"}, b"busy +2AA-")
    result = classify("b", response, max_retry_after_s=60)
    assert result.status is Status.RETRYING and result.error is not None
    result.error.encode()  # raised UnicodeEncodeError, and the message was called again until poison


async def test_a_token_correction_counts_in_the_minute_of_the_call(redis: aioredis.Redis, keys: Keys) -> None:
    limits = BackendLimits(redis=redis, keys=keys, lease_s=1)
    started = 60 * 1000 + 59.5  # a call that began at :59.5 and ended in the next minute
    [effect] = limits.correct("a", tpm=1000, estimated=1000, used=10, acquired_at=started)
    assert effect.keys == (keys.backend_window("a", "tpm", 1000),)


async def test_a_dispatcher_does_not_call_for_an_entry_another_consumer_took_over(
    redis: aioredis.Redis, keys: Keys
) -> None:
    # Given a message whose dispatch entry another consumer owns now (this one's lease lapsed meanwhile)
    async with Harness(redis, keys, backends={"a": MockSettings(latency_ms=1)}, stages=()) as h:
        dispatcher = Dispatch(config=h.config, redis=redis, keys=keys)
        await dispatcher.start()
        try:
            msg = new_message(message_id=new_id(), level="normal", request=CHAT)
            await ensure_group(redis, keys.dispatch, "dispatch")
            await redis.xadd(keys.dispatch, {FIELD: encode(msg)})
            reply = await redis.xreadgroup("dispatch", "other-1", {keys.dispatch: ">"})
            commit = Commit(redis, stream=keys.dispatch, group="dispatch", channel=keys.finished, dlq=keys.dlq)
            batch = Batch(
                parse_entries(reply[0][1]),
                commit=commit,
                consumer="me-1",
                on_commit=lambda *_: None,
                owned_for_sure=False,  # handled again in-process, or held long: checked
            )
            # When this consumer handles it (an in-process retry, a stall that outlived its lease)
            await dispatcher.handle(batch)
            await batch.commit()
        finally:
            await dispatcher.close()
        calls = h.mocks["a"].calls
    # Then it makes no call and settles nothing: the entry is the other consumer's
    assert calls == 0
    assert await redis.hget(keys.msg(msg.id), "status") is None
    assert (await redis.xpending(keys.dispatch, "dispatch"))["pending"] == 1


async def test_a_slot_held_already_is_not_counted_again(redis: aioredis.Redis, keys: Keys) -> None:
    limits = BackendLimits(redis=redis, keys=keys, lease_s=30)
    now = time.time()
    taken = [await limits.acquire("a", "m1", slots=4, rpm=10, tpm=1000, tokens=100, now=now) for _ in range(2)]
    assert taken == [1, 2]
    assert await redis.get(keys.backend_window("a", "tpm", int(now // 60))) == b"100"
    assert limits.correct("a", tpm=1000, estimated=100, used=5, acquired_at=None) == []


async def test_a_message_taken_over_while_it_waited_for_a_slot_is_not_called(redis: aioredis.Redis, keys: Keys) -> None:
    # Given a dispatcher (claim timeout 1 s: renewals every third) whose message waits for the backend's one
    # slot, held by another call
    env = {"LLMQ_QUEUE__WORKER__CLAIM_TIMEOUT": "1s"}
    config = {"a": {"max_concurrent": 1}}
    async with Harness(
        redis, keys, backends={"a": MockSettings(latency_ms=1)}, backend_config=config, env=env, stages=()
    ) as h:
        dispatcher = Dispatch(config=h.config, redis=redis, keys=keys)
        await dispatcher.start()
        try:
            await redis.zadd(keys.backend_slots("a"), {"another-call": time.time() + 60})
            msg = new_message(message_id=new_id(), level="normal", request=CHAT)
            await ensure_group(redis, keys.dispatch, "dispatch")
            await redis.xadd(keys.dispatch, {FIELD: encode(msg)})
            reply = await redis.xreadgroup("dispatch", "me-1", {keys.dispatch: ">"})
            [entry] = parse_entries(reply[0][1])
            commit = Commit(redis, stream=keys.dispatch, group="dispatch", channel=keys.finished, dlq=keys.dlq)
            batch = Batch([entry], commit=commit, consumer="me-1", on_commit=lambda *_: None)
            handling = asyncio.create_task(dispatcher.handle(batch))
            # When, while it waits, another consumer takes its entry over, and then the slot frees
            await asyncio.sleep(0.5)
            await redis.xclaim(keys.dispatch, "dispatch", "other-1", 0, [entry.id], justid=True)
            await redis.zrem(keys.backend_slots("a"), "another-call")
            await asyncio.wait_for(handling, timeout=5)
            await batch.commit()
        finally:
            await dispatcher.close()
        calls = h.mocks["a"].calls
    # Then it does not call: the message is the other consumer's now, and the slot it took is freed
    assert calls == 0
    assert await redis.zcard(keys.backend_slots("a")) == 0


async def test_messages_complete_with_the_backend_response(redis: aioredis.Redis, keys: Keys) -> None:
    async with Harness(redis, keys, backends={"a": MockSettings(latency_ms=5)}) as h:
        ids = [await h.submit("normal") for _ in range(20)]
        statuses = await h.wait_terminal(ids)
    assert {s["status"] for s in statuses.values()} == {"completed"}
    result = msgspec.json.decode(statuses[ids[0]]["result"])
    assert result["choices"][0]["message"]["content"] == "mock reply from a"
    assert result["usage"]["total_tokens"] > 0
    done = [decode_outcome(f[FIELD]) for _, f in await redis.xrange(keys.done)]
    assert sorted(o.message.id for o in done) == sorted(ids)
    assert all(o.backend == "a" and o.response is not None and o.prompt_tokens for o in done)
    assert await redis.zcard(keys.inflight("normal")) == 0  # slots released


async def test_an_echo_backend_answers_inside_the_dispatcher(redis: aioredis.Redis, keys: Keys) -> None:
    env = {"LLMQ_BACKENDS": '[{name: echo, url: "echo://local/v1"}]'}
    async with Harness(redis, keys, backends={}, env=env) as h:
        ids = [await h.submit("normal") for _ in range(10)]
        statuses = await h.wait_terminal(ids)
    assert {s["status"] for s in statuses.values()} == {"completed"}
    assert {s["backend"] for s in statuses.values()} == {"echo"}
    result = msgspec.json.decode(statuses[ids[0]]["result"])
    assert result["choices"][0]["message"]["content"] == "mock reply from echo"


async def test_tpm_estimates_hold_calls_back_and_usage_corrects_them(redis: aioredis.Redis, keys: Keys) -> None:
    # Each call is estimated at 257 tokens ("hello" is 1 prompt token, no max_tokens: a budget of 256),
    # so 600 tokens a minute admit two at once. The mock reports 17 used, and the correction makes room
    # for the rest within the same minute: without it the third call would wait for the next minute.
    backends = {"a": MockSettings(latency_ms=100)}
    await _clear_of_a_minute_boundary(margin_s=10)
    async with Harness(redis, keys, backends=backends, backend_config={"a": {"max_concurrent": 8, "tpm": 600}}) as h:
        ids = [await h.submit() for _ in range(6)]
        statuses = await h.wait_terminal(ids, within=8)
        peak = h.mocks["a"].peak
    assert {s["status"] for s in statuses.values()} == {"completed"}
    assert peak == 2


async def test_rpm_holds_calls_until_the_next_minute_and_shutdown_gives_them_back(
    redis: aioredis.Redis, keys: Keys
) -> None:
    backends = {"a": MockSettings(latency_ms=1)}
    await _clear_of_a_minute_boundary(margin_s=10)
    async with Harness(redis, keys, backends=backends, backend_config={"a": {"max_concurrent": 8, "rpm": 3}}) as h:
        ids = [await h.submit() for _ in range(5)]

        async def three_completed() -> bool:
            return [(await h.status(i)).get("status") for i in ids].count("completed") == 3

        await eventually(three_completed, what="the minute's 3 calls")
        await asyncio.sleep(0.5)  # the other two keep waiting for a slot in the next minute
        calls = h.mocks["a"].calls
        stopping = time.monotonic()
    stopped_in = time.monotonic() - stopping
    waiting = [i for i in ids if (await h.status(i)).get("status") != "completed"]
    pending = await redis.xpending(keys.dispatch, "dispatch")
    assert calls == 3 and len(waiting) == 2
    # A call that never started does not hold shutdown for the grace period (30 s): it is given back,
    # pending in the dispatch group for the next dispatcher.
    assert stopped_in < 5 and pending["pending"] == 2


async def test_a_call_that_fails_unexpectedly_frees_its_backend_slot_at_once(
    redis: aioredis.Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a bug: reading a backend's answer raises
    def broken(*_: object) -> None:
        raise RuntimeError("a bug reading the answer")

    monkeypatch.setattr(calls, "classify", broken)
    async with Harness(redis, keys, backends={"a": MockSettings(latency_ms=5)}) as h:
        # When a message's call ends in it
        await h.submit("normal")
        await eventually(lambda: _called(h), what="the backend was called")
        # Then the batch fails and the message stays pending, but the backend slot does not wait for its
        # lease (scheduler.timeout + 5 s) to expire
        await eventually(lambda: _no_slot_taken(redis, keys, "a"), within=2, what="the slot freed")


async def test_round_robin_spreads_evenly(redis: aioredis.Redis, keys: Keys) -> None:
    backends = {n: MockSettings(latency_ms=1) for n in ("a", "b", "c")}
    env = {"LLMQ_QUEUE__WORKER__MAX_CONCURRENT": "1"}
    async with Harness(redis, keys, backends=backends, env=env) as h:
        ids = [await h.submit() for _ in range(30)]
        await h.wait_terminal(ids)
        calls = {n: m.calls for n, m in h.mocks.items()}
    assert calls == {"a": 10, "b": 10, "c": 10}


async def test_least_connections_prefers_idle_backends(redis: aioredis.Redis, keys: Keys) -> None:
    backends = {"slow": MockSettings(latency_ms=500), "fast": MockSettings(latency_ms=5)}
    env = {"LLMQ_LOADBALANCER__ALGORITHM": "least_connections"}
    async with Harness(redis, keys, backends=backends, env=env) as h:
        ids = [await h.submit() for _ in range(40)]
        await h.wait_terminal(ids)
        calls = {n: m.calls for n, m in h.mocks.items()}
    assert calls["fast"] > 3 * calls["slow"], calls


async def test_session_affinity_pins_a_session_to_one_backend(redis: aioredis.Redis, keys: Keys) -> None:
    backends = {n: MockSettings(latency_ms=1) for n in ("a", "b", "c")}
    async with Harness(redis, keys, backends=backends) as h:
        ids = [await h.submit(session_id="chat-42") for _ in range(12)]
        statuses = await h.wait_terminal(ids)
        others = [await h.submit(session_id=f"s{i}") for i in range(12)]
        other_statuses = await h.wait_terminal(others)
    assert {s["backend"] for s in statuses.values()} == {statuses[ids[0]]["backend"]}
    assert len({s["backend"] for s in other_statuses.values()}) > 1


async def test_a_failing_backend_is_taken_out_and_comes_back(redis: aioredis.Redis, keys: Keys) -> None:
    # Given three backends of which one fails every call
    backends = {
        "good1": MockSettings(latency_ms=5),
        "good2": MockSettings(latency_ms=5),
        "bad": MockSettings(fail_rate=1.0, latency_ms=5),
    }
    env = {
        "LLMQ_LOADBALANCER__MAX_FAILURES": "2",
        "LLMQ_LOADBALANCER__HEALTH_CHECK_INTERVAL": "3s",
        "LLMQ_QUEUE__RETRY__MAX_RETRIES": "5",
    }
    async with Harness(redis, keys, backends=backends, env=env) as h:
        ids = [await h.submit() for _ in range(60)]
        statuses = await h.wait_terminal(ids)
        # Then it is taken out: no message failed, and new traffic avoids it
        assert 'llmq_backend_up{backend="bad"} 0.0' in await _metrics(h)
        bad_calls = h.mocks["bad"].calls
        more = [await h.submit() for _ in range(30)]
        await h.wait_terminal(more)
        assert h.mocks["bad"].calls <= bad_calls + 1  # at most one half-open trial after a probe
        # When it recovers, the health probe brings it back and it gets traffic again
        h.mocks["bad"].settings = MockSettings(latency_ms=5)
        await eventually(lambda: _backend_up(h, "bad"), within=8, what="bad probed back in")
        before = h.mocks["bad"].calls
        again = [await h.submit() for _ in range(30)]
        await h.wait_terminal(again)
        calls_after = h.mocks["bad"].calls
    assert {s["status"] for s in statuses.values()} == {"completed"}
    assert calls_after >= before + 5


async def test_a_hanging_backend_times_out_and_the_retry_goes_elsewhere(redis: aioredis.Redis, keys: Keys) -> None:
    # Given three backends of which one never answers, and a circuit that will not open on its own
    backends = {
        "a": MockSettings(latency_ms=5),
        "b": MockSettings(latency_ms=5),
        "hang": MockSettings(latency_ms=60_000),
    }
    env = {"LLMQ_SCHEDULER__TIMEOUT": "500ms", "LLMQ_LOADBALANCER__MAX_FAILURES": "1000"}
    async with Harness(redis, keys, backends=backends, env=env) as h:
        # When messages arrive, half of them in sessions (pinned to one backend)
        ids = [await h.submit() for _ in range(15)]
        ids += [await h.submit(session_id=f"s{i}") for i in range(15)]
        statuses = await h.wait_terminal(ids)
        hung = h.mocks["hang"].by_message
    # Then every call to the hanging backend timed out, and each such message completed on another one
    assert {s["status"] for s in statuses.values()} == {"completed"}
    assert len(hung) >= 5, hung
    assert max(hung.values()) == 1, hung
    for message_id in hung:
        assert statuses[message_id]["attempts"] == "2"
        assert statuses[message_id]["backend"] in {"a", "b"}


async def test_client_errors_fail_without_retry(redis: aioredis.Redis, keys: Keys) -> None:
    backends = {"a": MockSettings(fail_rate=1.0, fail_status=400)}
    async with Harness(redis, keys, backends=backends) as h:
        [mid] = [await h.submit()]
        status = (await h.wait_terminal([mid]))[mid]
        calls = h.mocks["a"].calls
    assert status["status"] == "failed" and "answered 400" in status["error"]
    assert calls == 1


async def test_an_unknown_model_fails_at_once(redis: aioredis.Redis, keys: Keys) -> None:
    async with Harness(redis, keys, backends={"a": MockSettings()}, backend_config={"a": {"models": ["llama"]}}) as h:
        mid = await h.submit()  # asks for model "m"
        status = (await h.wait_terminal([mid]))[mid]
    assert status["status"] == "failed" and "no backend serves model 'm'" in status["error"]


def test_round_robin_rotates() -> None:
    lb = Balancer("round_robin")
    backends = [BackendView(n, 1, 0) for n in "abc"]
    firsts = [lb.order(backends)[0] for _ in range(6)]
    assert firsts == ["a", "b", "c", "a", "b", "c"]


def test_least_connections_prefers_the_idle_backend() -> None:
    lb = Balancer("least_connections")
    assert lb.order([BackendView("busy", 1, 5), BackendView("idle", 1, 0), BackendView("some", 1, 2)]) == [
        "idle",
        "some",
        "busy",
    ]
    # in-flight is weighed by capacity share
    assert lb.order([BackendView("big", 4, 4), BackendView("small", 1, 2)])[0] == "big"


def test_weighted_balancing_follows_weights() -> None:
    lb = Balancer("weighted")
    backends = [BackendView("a", 3, 0), BackendView("b", 1, 0)]
    assert Counter(lb.order(backends)[0] for _ in range(400)) == {"a": 300, "b": 100}


def test_circuit_opens_after_max_failures_and_probes_back_half_open() -> None:
    c = Circuit(max_failures=3)
    assert [c.failure() for _ in range(3)] == [False, False, True]
    assert not c.usable(NOW)
    assert c.probe(healthy=False) is False and not c.usable(NOW)
    assert c.probe(healthy=True) is True and c.usable(NOW)
    assert c.failure() is True  # half-open: one more failure opens it again
    c.success()
    assert c.usable(NOW) and c.failures == 0


def test_retry_after_cools_a_backend_until_then() -> None:
    c = Circuit(max_failures=3)
    c.cool(NOW + 5)
    assert not c.usable(NOW + 4.9) and c.usable(NOW + 5)


@pytest.mark.parametrize(
    ("response", "status", "error"),
    [
        (Answer(200, content=b'{"choices": []}'), Status.COMPLETED, None),
        # a success whose body is not a completion is the backend's fault: retried, never a crashed batch
        (Answer(200, content=b'["not", "a", "completion"]'), Status.RETRYING, "JSON that is not an object"),
        (Answer(200, content=b'"text"'), Status.RETRYING, "JSON that is not an object"),
        (Answer(200, content=b"<html>"), Status.RETRYING, "invalid JSON"),
        (Answer(503, content=b"overloaded"), Status.RETRYING, "answered 503: overloaded"),
        (Answer(400, content=b"bad request"), Status.FAILED, "answered 400: bad request"),
    ],
)
def test_a_backend_answer_is_classified(response: Answer, status: Status, error: str | None) -> None:
    result = classify("b", response, max_retry_after_s=60)
    assert result.status is status and result.backend == "b"
    assert (result.error is None) if error is None else (error in (result.error or ""))
    assert (result.response is not None) is (status is Status.COMPLETED)


def test_429_carries_its_retry_after() -> None:
    result = classify("b", Answer(429, {"Retry-After": "2.5"}), max_retry_after_s=60)
    assert result.status is Status.RETRYING and result.retry_after == 2.5


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("inf", None),
        ("nan", None),
        ("-inf", None),
        ("1e12", 60.0),
        ("-3", 0.0),
        ("soon", None),
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),  # a date in the past
        ("Fri, 31 Dec 2100 23:59:59 GMT", 60.0),  # far in the future: clamped
    ],
)
def test_retry_after_is_finite_and_never_past_max_backoff(header: str, seconds: float | None) -> None:
    # A backend's Retry-After of inf or 1e12 parked a message for ever and took the backend out of rotation
    result = classify("b", Answer(503, {"Retry-After": header}), max_retry_after_s=60)
    assert result.status is Status.RETRYING and result.retry_after == seconds


def test_retry_after_as_an_http_date_counts_from_now() -> None:
    assert retry_after("Sun, 29 Nov 2026 15:00:30 GMT", max_s=60, now=1795964400.0) == pytest.approx(30.0)


def test_token_estimate_counts_prompt_and_budget() -> None:
    assert estimate_tokens({"messages": [{"role": "user", "content": "x" * 400}], "max_tokens": 50}) == 150
    assert estimate_tokens({"messages": []}) == 256


async def test_the_backend_pool_holds_every_call_in_flight_at_once() -> None:
    # httpx's pool queued calls behind each other past a few connections; LLM calls are long and many
    mock = MockBackend(MockSettings(latency_ms=300, jitter_ms=0))
    server = OpsServer(mock.app(), host="127.0.0.1", port=0)
    server.start()
    pool = Pool(concurrency=100, connect_timeout_s=5, read_timeout_s=10)
    try:
        url = f"http://127.0.0.1:{server.port}/v1/chat/completions"
        body = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'
        answers = await asyncio.gather(*(pool.post(url, body, {}) for _ in range(100)))
        assert {a.status for a in answers} == {200} and mock.peak == 100
    finally:
        await pool.aclose()
        await server.stop()


async def test_a_backend_that_refuses_connections_is_an_http_error() -> None:
    pool = Pool(concurrency=1, connect_timeout_s=5, read_timeout_s=5)
    try:
        with pytest.raises(HTTPError):
            await pool.post(f"http://127.0.0.1:{free_port()}/v1/chat/completions", b"{}", {})
    finally:
        await pool.aclose()


def test_an_answer_reads_its_text_in_the_charset_it_names() -> None:
    assert Answer(200, {"Content-Type": "text/plain; charset=latin-1"}, "é".encode("latin-1")).text == "é"
    assert Answer(200, {"Content-Type": "text/plain; charset=nonsense"}, b"\xff ok").text == "\ufffd ok"


def test_an_answer_in_a_codec_that_is_no_text_encoding_reads_as_utf8() -> None:
    # codecs.lookup knows base64; a 503 naming it was failed instead of retried
    answer = Answer(503, {"content-type": "text/plain; charset=base64"}, b"overloaded")
    assert answer.text == "overloaded"
    assert classify("a", answer, max_retry_after_s=10).status is Status.RETRYING


async def test_a_request_the_client_refuses_to_send_is_a_call_error_naming_no_secret() -> None:
    pool = Pool(concurrency=1, connect_timeout_s=5, read_timeout_s=5)
    try:
        # a header with a line break (an API key with one inside): aiohttp raises ValueError, which crashed
        # the batch and made the message poison
        with pytest.raises(HTTPError):
            await pool.post(f"http://127.0.0.1:{free_port()}/v1/chat/completions", b"{}", {"Authorization": "a\nb"})
        # a URL with credentials that cannot be called: the error, which is stored and logged, hides them
        for url in (f"http://user:s3cret@127.0.0.1:{free_port()}/v1", "http://user:s3cret@[::1/v1"):
            with pytest.raises(HTTPError) as failed:
                await pool.post(url, b"{}", {})
            assert "s3cret" not in str(failed.value)
    finally:
        await pool.aclose()


@contextlib.asynccontextmanager
async def recording_backend(seen: list[tuple[str, str, str | None]]) -> AsyncIterator[str]:
    """A backend that answers a completion POST with 302 to a path that answers any method with a completion,
    recording every request (method, path, Authorization); its base URL."""

    async def moved(request: web.Request) -> web.Response:
        seen.append((request.method, request.path, request.headers.get("Authorization")))
        if request.headers.get("Authorization") == "Bearer sk-redirect":
            raise web.HTTPFound(location="/elsewhere")
        return web.json_response({"choices": [{"message": {"role": "assistant", "content": "yours"}}]})

    async def elsewhere(request: web.Request) -> web.Response:
        seen.append((request.method, request.path, request.headers.get("Authorization")))
        return web.json_response({"choices": [{"message": {"role": "assistant", "content": "NOT YOUR ANSWER"}}]})

    app = web.Application()
    app.router.add_route("POST", "/v1/chat/completions", moved)
    app.router.add_route("*", "/elsewhere", elsewhere)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(("key", "outcome"), [("sk-redirect", "failed"), ("sk-file\n", "completed")])
async def test_a_redirect_is_the_backends_answer_and_a_key_is_sent_without_its_newline(
    redis: aioredis.Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch, key: str, outcome: str
) -> None:
    # Given a backend that redirects calls made with one key, and a key as read from a secret's file
    seen: list[tuple[str, str, str | None]] = []
    monkeypatch.setenv("LLMQ_TEST_BACKEND_KEY", key)
    async with recording_backend(seen) as url:
        env = {
            "LLMQ_BACKENDS": f'[{{name: a, url: "{url}", max_concurrent: 4, api_key_env: LLMQ_TEST_BACKEND_KEY}}]',
            "LLMQ_QUEUE__RETRY__MAX_RETRIES": "0",
        }
        async with Harness(redis, keys, backends={}, env=env) as h:
            mid = await h.submit()
            status = (await h.wait_terminal([mid], within=10))[mid]
    # Then a 302 fails the message as the backend's answer (following it made a GET of another resource and
    # stored its body as the completion), and the key goes out trimmed (its newline crashed the batch)
    assert status["status"] == outcome, status
    assert seen == [("POST", "/v1/chat/completions", f"Bearer {key.strip()}")]
    if outcome == "failed":
        assert "answered 302" in status["error"]


async def test_the_machines_netrc_is_never_sent_to_a_backend(
    redis: aioredis.Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Given a machine whose netrc has a default login (for git, a package index...), and a backend with a key
    netrc = tmp_path / "netrc"
    netrc.write_text("default login deploy password hunter2\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    monkeypatch.setenv("LLMQ_TEST_BACKEND_KEY", "sk-abc")
    seen: list[tuple[str, str, str | None]] = []
    async with recording_backend(seen) as url:
        # When a call is made without a key, and a message is sent with one
        pool = Pool(concurrency=1, connect_timeout_s=5, read_timeout_s=5)
        try:
            await pool.post(url + "/chat/completions", b"{}", {})
        finally:
            await pool.aclose()
        env = {"LLMQ_BACKENDS": f'[{{name: a, url: "{url}", max_concurrent: 4, api_key_env: LLMQ_TEST_BACKEND_KEY}}]'}
        async with Harness(redis, keys, backends={}, env=env) as h:
            mid = await h.submit()
            status = (await h.wait_terminal([mid], within=10))[mid]
    # Then the backend saw no netrc login (aiohttp's trust_env sent it, and refused the key beside it)
    assert [auth for _, _, auth in seen] == [None, "Bearer sk-abc"] and status["status"] == "completed"


async def test_calls_go_through_the_environments_proxy_unless_no_proxy_exempts_the_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given an HTTP proxy named by the environment (it answers every request itself, as a test stand-in)
    seen: list[str] = []

    async def proxied(request: web.Request) -> web.Response:
        seen.append(str(request.url))
        return web.json_response({"choices": []})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", proxied)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("NO_PROXY", "exempt.invalid")
    pool = Pool(concurrency=1, connect_timeout_s=2, read_timeout_s=5)
    try:
        # When backends are called by a name only the proxy could reach, then the call goes through the proxy
        answer = await pool.post("http://backend.invalid/v1/chat/completions", b"{}", {})
        assert answer.status == 200 and seen == ["http://backend.invalid/v1/chat/completions"]
        # and a host NO_PROXY names is called directly (here: a name that resolves nowhere)
        with pytest.raises(HTTPError):
            await pool.post("http://exempt.invalid/v1/chat/completions", b"{}", {})
        assert len(seen) == 1
    finally:
        await pool.aclose()
        await runner.cleanup()


async def test_an_unsendable_request_fails_its_message_at_once_and_spares_the_circuit(
    redis: aioredis.Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a backend key with a line break inside it (no trim can mend that)
    monkeypatch.setenv("LLMQ_TEST_BACKEND_KEY", "sk-a\nb")
    config = {"a": {"max_concurrent": 4, "api_key_env": "LLMQ_TEST_BACKEND_KEY"}}
    async with Harness(redis, keys, backends={"a": MockSettings(latency_ms=1)}, backend_config=config) as h:
        mid = await h.submit()
        status = (await h.wait_terminal([mid], within=10))[mid]
        [dispatch] = [s for s in h.stages if isinstance(s, Dispatch)]
        circuit = dispatch.router.circuits["a"]
    # Then the message fails once, saying why (sending it again would fail the same way), the key unshown
    assert status["status"] == "failed" and status["attempts"] == "1"
    assert "cannot be sent" in status["error"] and "sk-a" not in status["error"]
    assert circuit.failures == 0


async def test_streams_left_early_close_their_connections_and_the_pool_goes_on() -> None:
    # Given a backend that streams for ten seconds, and a pool of 17 connections (concurrency 1 + spares)
    gone = started = 0

    async def stream(request: web.Request) -> web.StreamResponse:
        nonlocal gone, started
        started += 1
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        try:
            await response.prepare(request)  # (a client cut by its timeout on a loaded machine may be gone already)
            for _ in range(1000):
                await response.write(b'data: {"choices": []}\n\n')
                await asyncio.sleep(0.01)
        except (ConnectionError, asyncio.CancelledError):
            gone += 1
            raise
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", stream)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    pool = Pool(concurrency=1, connect_timeout_s=5, read_timeout_s=5)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    try:
        # When 40 streams are left after their first chunk, and 10 more are cut by a timeout mid-body
        for _ in range(40):
            async with pool.stream(url, b"{}", {}) as reply:
                async for _ in calls.sse_data(reply):
                    break
        for _ in range(10):
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.1), pool.stream(url, b"{}", {}) as reply:
                    async for _ in calls.sse_data(reply):
                        pass
        # Then the backend saw each of the 50 clients go (so it can stop generating), and the pool is not used up
        await eventually(lambda: _true(gone == started >= 40), what="the backend to see every client gone", within=5)
        async with asyncio.timeout(5), pool.stream(url, b"{}", {}) as reply:
            assert reply.status == 200
    finally:
        await pool.aclose()
        await runner.cleanup()


async def _true(value: bool) -> bool:
    return value
