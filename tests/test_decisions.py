"""Pure decisions, no servers: admission order, staggering, load-balancer choice, circuits, retry backoff."""

from __future__ import annotations

import contextlib
from collections import Counter

import httpx
import pytest

from llmq.pipeline.backoff import retry_delay
from llmq.pipeline.models import Status
from llmq.stages.dispatch.calls import classify, estimate_tokens, retry_after
from llmq.stages.dispatch.http_pool import CONNECTIONS_PER_SHARD, ShardedClient
from llmq.stages.dispatch.routing import BackendView, Balancer, Circuit
from llmq.stages.retry import reason_of
from llmq.stages.schedule.admission import LevelView, select
from llmq.stages.schedule.stagger import MIN_CALLS, Stagger, stagger

NOW = 1000.0


def levels(
    free: int = 10, reserved: dict[str, int] | None = None, weights: dict[str, int] | None = None
) -> list[LevelView]:
    spec = [("realtime", 1, 0.1), ("high", 2, 5.0), ("normal", 3, 30.0), ("low", 4, 120.0)]
    reserved = reserved or {}
    weights = weights or {}
    return [LevelView(name, prio, wait, weights.get(name, 1), free, reserved.get(name, 0)) for name, prio, wait in spec]


def fresh(n: int) -> list[float]:
    return [NOW - 0.01] * n


def test_priority_based_serves_higher_levels_first() -> None:
    heads = {"low": fresh(5), "realtime": fresh(2), "high": fresh(2)}
    assert select(heads, levels(), 6, NOW, "priority_based") == ["realtime"] * 2 + ["high"] * 2 + ["low"] * 2


def test_aging_serves_an_overdue_low_message_ahead_of_fresh_high_ones() -> None:
    heads = {"high": fresh(3), "low": [NOW - 121.0, NOW - 1.0]}
    assert select(heads, levels(), 2, NOW, "priority_based") == ["low", "high"]


def test_among_overdue_messages_higher_priority_wins() -> None:
    heads = {"high": [NOW - 6.0], "low": [NOW - 200.0]}
    assert select(heads, levels(), 1, NOW, "priority_based") == ["high"]


def test_a_level_never_exceeds_its_free_slots_nor_the_total() -> None:
    views = [v if v.name != "realtime" else LevelView("realtime", 1, 0.1, 1, 1, 0) for v in levels()]
    order = select({"realtime": fresh(5), "low": fresh(50)}, views, 4, NOW, "priority_based")
    assert order == ["realtime", "low", "low", "low"]


def test_reserved_slots_are_kept_for_higher_levels() -> None:
    # 4 free slots, 2 reserved for realtime which has nothing waiting: low may take only 2
    order = select({"low": fresh(10)}, levels(reserved={"realtime": 2}), 4, NOW, "priority_based")
    assert order == ["low", "low"]
    # and realtime itself may use them
    assert (
        select({"realtime": fresh(3)}, levels(reserved={"realtime": 2}), 4, NOW, "priority_based") == ["realtime"] * 3
    )


def test_weighted_shares_follow_the_weights() -> None:
    state: dict[str, int] = {}
    heads = {"high": fresh(1000), "low": fresh(1000)}
    order = select(heads, levels(free=1000, weights={"high": 3, "low": 1}), 400, NOW, "weighted", state)
    counts = Counter(order)
    assert counts == {"high": 300, "low": 100}
    assert order[:4].count("low") == 1  # smooth: low is interleaved, not starved until the end


def test_deadline_serves_the_earliest_due_first() -> None:
    # normal enqueued 29.9 s ago is due in 0.1 s; realtime enqueued now is due in 0.1 s too but later
    heads = {"normal": [NOW - 29.95], "realtime": [NOW], "low": [NOW - 1]}
    assert select(heads, levels(), 3, NOW, "deadline") == ["normal", "realtime", "low"]


def test_nothing_waiting_or_no_capacity_selects_nothing() -> None:
    assert select({}, levels(), 10, NOW, "priority_based") == []
    assert select({"low": fresh(3)}, levels(), 0, NOW, "priority_based") == []


def test_regular_calls_are_staggered_over_the_call_duration() -> None:
    s = Stagger(slots=10)
    assert s.interval_s() == 0  # no call has ended: nothing says how long one takes
    for held in [0.200, 0.201, 0.199, 0.202, 0.200, 0.350]:  # one slow call (a new connection) among them
        s.observe(held)
    assert s.interval_s() == pytest.approx(0.9 * 0.2005 / 10, rel=0.01)


def test_irregular_calls_are_not_staggered() -> None:
    s = Stagger(slots=10)
    for held in [0.160, 0.240, 0.200, 0.180, 0.230, 0.170, 0.210, 0.190]:  # 200 ± 40 ms
        s.observe(held)
    assert s.interval_s() == 0  # they spread the ends out by themselves
    assert Stagger(slots=0).interval_s() == 0  # every slot reserved: nothing to stagger


def test_calls_too_short_for_the_slots_are_not_staggered() -> None:
    # 2 ms calls on 1200 slots would want 1.5 us between admissions: one per round would only slow them
    s = Stagger(slots=1200)
    for _ in range(16):
        s.observe(0.002)
    assert s.interval_s() == 0


def test_staggering_waits_for_enough_calls_and_follows_the_latest() -> None:
    s = Stagger(slots=4)
    for _ in range(MIN_CALLS - 1):
        s.observe(0.1)
    assert s.interval_s() == 0
    s.observe(0.1)
    assert s.interval_s() == pytest.approx(0.9 * 0.1 / 4)
    for _ in range(16):
        s.observe(1.0)  # the backend became slower
    assert s.interval_s() == pytest.approx(0.9 * 1.0 / 4)


def test_stagger_keeps_the_unstaggered_picks_and_a_budget_of_the_others() -> None:
    order = ["realtime", "high", "high", "realtime", "low"]
    assert stagger(order, {"high", "low"}, 1) == ["realtime", "high", "realtime"]
    assert stagger(order, {"high", "low"}, 0) == ["realtime", "realtime"]
    assert stagger(order, set(), 0) == order


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


@pytest.mark.parametrize(("attempt", "expected"), [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (7, 60.0), (20, 60.0)])
def test_backoff_follows_the_seed_schedule(attempt: int, expected: float) -> None:
    # initial 1s, factor 2, max 60s; rand=0 gives the undiminished delay, rand=1 the most jitter
    kwargs = {"initial_s": 1.0, "factor": 2.0, "max_s": 60.0}
    assert retry_delay(attempt, rand=0.0, **kwargs) == pytest.approx(expected)
    assert retry_delay(attempt, rand=1.0, **kwargs) == pytest.approx(expected * 0.8)


def test_retry_after_is_honoured_when_longer() -> None:
    assert retry_delay(1, initial_s=1, factor=2, max_s=60, retry_after_s=10, rand=0.0) == 10
    assert retry_delay(3, initial_s=1, factor=2, max_s=60, retry_after_s=0.5, rand=0.0) == 4


@pytest.mark.parametrize(
    ("response", "status", "error"),
    [
        (httpx.Response(200, json={"choices": []}), Status.COMPLETED, None),
        # a success whose body is not a completion is the backend's fault: retried, never a crashed batch
        (httpx.Response(200, json=["not", "a", "completion"]), Status.RETRYING, "JSON that is not an object"),
        (httpx.Response(200, json="text"), Status.RETRYING, "JSON that is not an object"),
        (httpx.Response(200, content=b"<html>"), Status.RETRYING, "invalid JSON"),
        (httpx.Response(503, text="overloaded"), Status.RETRYING, "answered 503: overloaded"),
        (httpx.Response(400, text="bad request"), Status.FAILED, "answered 400: bad request"),
    ],
)
def test_a_backend_answer_is_classified(response: httpx.Response, status: Status, error: str | None) -> None:
    result = classify("b", response, max_retry_after_s=60)
    assert result.status is status and result.backend == "b"
    assert (result.error is None) if error is None else (error in (result.error or ""))
    assert (result.response is not None) is (status is Status.COMPLETED)


def test_429_carries_its_retry_after() -> None:
    result = classify("b", httpx.Response(429, headers={"Retry-After": "2.5"}), max_retry_after_s=60)
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
    result = classify("b", httpx.Response(503, headers={"Retry-After": header}), max_retry_after_s=60)
    assert result.status is Status.RETRYING and result.retry_after == seconds


def test_retry_after_as_an_http_date_counts_from_now() -> None:
    assert retry_after("Sun, 29 Nov 2026 15:00:30 GMT", max_s=60, now=1795964400.0) == pytest.approx(30.0)


def test_token_estimate_counts_prompt_and_budget() -> None:
    assert estimate_tokens({"messages": [{"role": "user", "content": "x" * 400}], "max_tokens": 50}) == 150
    assert estimate_tokens({"messages": []}) == 256


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        ("timeout after 30s", "timeout"),
        ("connection error: ConnectError()", "connection"),
        ("backend a answered 503: busy", "http_503"),
        ("every backend for 'm' is down", "no_backend"),
    ],
)
def test_retry_reasons(error: str, reason: str) -> None:
    assert reason_of(error) == reason


async def test_backend_calls_spread_over_http_shards_least_busy_first() -> None:
    pool = ShardedClient(concurrency=3 * CONNECTIONS_PER_SHARD, timeout=httpx.Timeout(1.0))
    try:
        async with contextlib.AsyncExitStack() as stack:
            # Three calls at once land on three different clients
            held = [await stack.enter_async_context(pool.client()) for _ in range(3)]
            assert len({id(c) for c in held}) == 3
            # and a fourth shares one of them only once all three are busy
            assert await stack.enter_async_context(pool.client()) in held
        async with pool.client() as first, pool.client() as second:
            assert first is not second  # finished calls free their shard
    finally:
        await pool.aclose()
