"""The schedule stage: admission decisions (priority, aging, weights, deadlines, reserved slots), the stagger
of regular calls, and the arbiter on real Redis behind floods of lower levels."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from llmq.pipeline import pausing
from llmq.pipeline.config import load_config
from llmq.pipeline.keys import Keys
from llmq.pipeline.models import FIELD, decode_outcome
from llmq.stages.mock_backend import MockSettings
from llmq.stages.schedule.admission import LevelView, select
from llmq.stages.schedule.arbiter import Arbiter
from llmq.stages.schedule.stagger import MIN_CALLS, Stagger, stagger
from tests.conftest import eventually
from tests.support.clients import QUEUEING
from tests.support.harness import CHAT, Harness
from tests.support.schedule import pending


async def _inflight(redis: aioredis.Redis, keys: Keys, level: str) -> int:
    return int(await redis.zcount(keys.inflight(level), time.time(), "+inf"))


async def _inflight_is(redis: aioredis.Redis, keys: Keys, level: str, n: int) -> bool:
    return await _inflight(redis, keys, level) >= n


async def _has(outcomes: Callable[[], Awaitable[dict[str, str]]], n: int) -> bool:
    return len(await outcomes()) >= n


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


async def test_the_arbiter_outlives_a_failed_round(
    redis: aioredis.Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a scheduler whose first admission round fails with an error that is not a connection's (and every
    # message admitted by it, none directly)
    async with Harness(redis, keys, backends={"a": MockSettings(latency_ms=1)}, env=QUEUEING) as h:
        arbiter = h.stages[0].arbiter  # type: ignore[attr-defined]
        round_ = arbiter._round
        failed = 0

        async def failing() -> None:
            nonlocal failed
            if not failed:
                failed += 1
                raise ResponseError("BUSY Redis is busy running a script.")
            await round_()

        monkeypatch.setattr(arbiter, "_round", failing)
        # When messages come, then they are still admitted and completed
        mid = await h.submit()
        status = (await h.wait_terminal([mid], within=10))[mid]
    assert status["status"] == "completed" and failed == 1


async def test_realtime_is_admitted_within_its_slo_behind_a_flood_of_low(redis: aioredis.Redis, keys: Keys) -> None:
    # Given backends kept busy by 1000 queued low messages (4 slots, 300 ms calls), one kept for realtime
    # always (reserve_window 0s: even before its first message)
    env = {
        "LLMQ_SCHEDULER__RESERVE_WINDOW": "0s",
        "LLMQ_QUEUE__LEVELS": "[{name: realtime, priority: 1, max_wait_time: 100ms, max_concurrent: 4, reserved: 1},"
        " {name: low, priority: 4, max_wait_time: 2s, max_concurrent: 4}]",
    }
    backends = {"a": MockSettings(latency_ms=300)}
    async with Harness(redis, keys, backends=backends, env=env, backend_config={"a": {"max_concurrent": 4}}) as h:
        low_ids = [await h.submit("low") for _ in range(1000)]
        await eventually(lambda: _inflight_is(redis, keys, "low", 3), what="low fills the unreserved slots")
        # When realtime messages arrive one by one
        rt_ids = []
        for _ in range(10):
            rt_ids.append(await h.submit("realtime"))
            await asyncio.sleep(0.35)
        statuses = await h.wait_terminal(rt_ids)
        low_done = sum([(await h.status(i)).get("status") == "completed" for i in low_ids[:50]])
        peak = h.mocks["a"].peak
    # Then each realtime message was admitted within its 100 ms max_wait_time
    waits = [float(s["scheduled_at"]) - float(s["enqueued_at"]) for s in statuses.values()]
    assert max(waits) <= 0.1, waits
    assert {s["status"] for s in statuses.values()} == {"completed"}
    # and low kept flowing, without the backend ever running more than its 4 slots
    assert low_done > 0
    assert peak <= 4


async def test_a_levels_reserved_slot_is_kept_only_while_it_had_traffic_recently(
    redis: aioredis.Redis, keys: Keys
) -> None:
    # Given 4 slots, one reserved for realtime while it had a message within the last 1.5 s, and 200 ms calls
    env = {
        "LLMQ_SCHEDULER__RESERVE_WINDOW": "1500ms",
        "LLMQ_QUEUE__LEVELS": "[{name: realtime, priority: 1, max_wait_time: 100ms, max_concurrent: 4, reserved: 1},"
        " {name: low, priority: 4, max_wait_time: 60s, max_concurrent: 4}]",
    }
    backends = {"a": MockSettings(latency_ms=200)}
    async with Harness(redis, keys, backends=backends, env=env, backend_config={"a": {"max_concurrent": 4}}) as h:
        # When a backlog of low arrives while realtime has been idle
        for _ in range(200):
            await h.submit("low")
        # Then low takes every slot: an idle realtime level costs it nothing
        await eventually(lambda: _inflight_is(redis, keys, "low", 4), what="low in all 4 slots")
        # When a realtime message comes, low is held to the 3 unreserved slots while realtime is active
        rt = await h.submit("realtime")
        await h.wait_terminal([rt])
        seen: list[int] = []
        started = time.monotonic()
        while time.monotonic() - started < 0.8:
            seen.append(await _inflight(redis, keys, "low"))
            await asyncio.sleep(0.02)
        assert max(seen[10:]) == 3, seen  # (calls admitted before the realtime message end within 200 ms)
        # and once realtime has been quiet for the window, low takes the fourth slot again
        await eventually(lambda: _inflight_is(redis, keys, "low", 4), within=5, what="low in 4 slots again")


@pytest.mark.parametrize("stagger", [True, False])
async def test_a_backlog_on_regular_calls_is_staggered_so_slots_free_one_by_one(
    redis: aioredis.Redis, keys: Keys, stagger: bool
) -> None:
    # Given 5 unreserved slots (6, one reserved for realtime, always) and calls of a fixed 100 ms
    env = {
        "LLMQ_SCHEDULER__RESERVE_WINDOW": "0s",
        "LLMQ_SCHEDULER__STAGGER": str(stagger).lower(),
        "LLMQ_QUEUE__LEVELS": "[{name: realtime, priority: 1, max_wait_time: 100ms, max_concurrent: 6, reserved: 1},"
        " {name: low, priority: 4, max_wait_time: 60s, max_concurrent: 6}]",
    }
    backends = {"a": MockSettings(latency_ms=100)}
    async with Harness(redis, keys, backends=backends, env=env, backend_config={"a": {"max_concurrent": 6}}) as h:
        # When a backlog of 50 low messages arrives at once
        ids = [await h.submit("low") for _ in range(50)]
        statuses = await h.wait_terminal(ids)
    admitted = sorted(float(s["scheduled_at"]) for s in statuses.values())
    finished = sorted(float(s["finished_at"]) for s in statuses.values())
    # The first 5 start together (no call has ended yet to say how long one takes), and so may the refills
    # of the next call or two, while the first calls (new connections, slower) weigh in the estimate; the
    # last 5 find no backlog behind them, and nothing holds them back
    later = [b - a for a, b in itertools.pairwise(admitted[20:-5])]
    ends = [b - a for a, b in itertools.pairwise(finished[10:-5])]
    if stagger:
        # Then, once calls have ended, admissions keep 0.9 × 100 ms / 5 slots = 18 ms apart, so slots free
        # one by one instead of five at once every 100 ms (but for a pair or two on a loaded machine, where
        # the calls seem to vary by more than the spacing for a moment and it is off)
        assert sum(gap < 0.015 for gap in later) <= 2, str([round(x, 4) for x in later])
        assert max(ends) < 0.08, ends  # (five at once leave a pause of about 95 ms)
    else:
        # (without staggering the first wave repeats: slots freed together are refilled together, in one
        # admission round or a few ms apart)
        assert any(gap < 0.002 for gap in later), later


async def test_aging_lets_low_through_under_a_stream_of_high(redis: aioredis.Redis, keys: Keys) -> None:
    env = {
        "LLMQ_QUEUE__LEVELS": "[{name: high, priority: 2, max_wait_time: 5s, max_concurrent: 2},"
        " {name: low, priority: 4, max_wait_time: 300ms, max_concurrent: 2}]",
    }
    backends = {"a": MockSettings(latency_ms=50)}
    async with Harness(redis, keys, backends=backends, env=env, backend_config={"a": {"max_concurrent": 2}}) as h:
        low = await h.submit("low")
        highs = [await h.submit("high") for _ in range(60)]  # 60 × 50 ms on 2 slots: 1.5 s of high work
        status = (await h.wait_terminal([low], within=10))[low]
        high_statuses = await h.wait_terminal(highs, within=20)
    last_high_start = max(float(s["scheduled_at"]) for s in high_statuses.values())
    # low started after waiting about its max_wait_time, long before the high backlog was through
    assert float(status["scheduled_at"]) < last_high_start - 0.5
    assert float(status["scheduled_at"]) - float(status["enqueued_at"]) < 1.0


async def test_level_and_backend_concurrency_limits_hold(redis: aioredis.Redis, keys: Keys) -> None:
    env = {"LLMQ_QUEUE__LEVELS": "[{name: normal, priority: 3, max_wait_time: 30s, max_concurrent: 5}]"}
    backends = {"a": MockSettings(latency_ms=100), "b": MockSettings(latency_ms=100)}
    config = {"a": {"max_concurrent": 2}, "b": {"max_concurrent": 10}}
    async with Harness(redis, keys, backends=backends, env=env, backend_config=config) as h:
        ids = [await h.submit("normal") for _ in range(60)]
        await h.wait_terminal(ids)
        peaks = {name: m.peak for name, m in h.mocks.items()}
    assert peaks["a"] <= 2
    assert peaks["a"] + peaks["b"] <= 5 + 1  # level max 5 (peaks are per backend, sampled apart)
    assert peaks["b"] <= 5


async def test_a_shutdown_during_an_admission_round_does_not_break_the_arbiter(
    redis: aioredis.Redis, keys: Keys
) -> None:
    env = {"LLMQ_KEY_PREFIX": keys.prefix, "LLMQ_BACKENDS": '[{name: a, url: "echo://a/v1", max_concurrent: 4}]'}
    arbiter = Arbiter(load_config(None, env=env), redis=redis, keys=keys)
    arbiter.offer("normal", await pending(redis, keys, "c1", 3, asyncio.Queue()))
    admit = arbiter._admit_run

    async def admit_then_shut_down(*args: Any) -> list[int | bytes]:
        admitted = await admit(*args)
        arbiter.give_back()  # SIGTERM arrives while the admission script runs
        return admitted

    arbiter._admit_run = admit_then_shut_down  # type: ignore[method-assign]
    await arbiter._round()  # raised IndexError (the emptied queue), which killed the arbiter task
    assert await redis.xlen(keys.dispatch) == 3
    assert not any(arbiter.waiting.values())


async def test_two_schedulers_keep_one_stagger_between_them(redis: aioredis.Redis, keys: Keys) -> None:
    # Given two scheduler processes' arbiters, each with a backlog of normal messages for 4 slots, that have
    # seen calls of a regular second end (a staggering interval of 0.9 × 1 s / 4 slots)
    env = {"LLMQ_KEY_PREFIX": keys.prefix, "LLMQ_BACKENDS": '[{name: a, url: "echo://a/v1", max_concurrent: 4}]'}
    arbiters = [Arbiter(load_config(None, env=env), redis=redis, keys=keys) for _ in range(2)]
    for n, arbiter in enumerate(arbiters):
        for _ in range(MIN_CALLS):
            arbiter.stagger.observe(1.0)
        arbiter.offer("normal", await pending(redis, keys, f"c{n}", 6, asyncio.Queue()))
    # When both run an admission round at once, and the first runs another
    for arbiter in [*arbiters, arbiters[0]]:
        await arbiter._round()
    # Then one message was admitted in all: the next waits for the interval, whichever process admits it
    assert await redis.xlen(keys.dispatch) == 1
    assert sorted(len(a.waiting["normal"]) for a in arbiters) == [5, 6]
    next_at = float(await redis.get(keys.stagger))
    assert next_at - time.time() == pytest.approx(0.225, abs=0.1)


async def test_expired_and_cancelled_messages_are_never_sent(redis: aioredis.Redis, keys: Keys) -> None:
    env = {"LLMQ_QUEUE__LEVELS": "[{name: normal, priority: 3, max_wait_time: 30s, max_concurrent: 1}]"}
    backends = {"a": MockSettings(latency_ms=400)}

    async def done() -> dict[str, str]:
        return {
            decode_outcome(f[FIELD]).message.id: decode_outcome(f[FIELD]).status
            for _, f in await redis.xrange(keys.done)
        }

    async with Harness(redis, keys, backends=backends, env=env, backend_config={"a": {"max_concurrent": 1}}) as h:
        blocker = await h.submit()
        expiring = await h.submit(deadline_ms=100)
        cancelled = await h.submit()
        await redis.hset(keys.msg(cancelled), "status", "cancelled")  # what DELETE /messages/{id} does
        statuses = await h.wait_terminal([blocker, expiring, cancelled])
        # A cancelled status is terminal at once; its outcome is recorded a moment later.
        await eventually(lambda: _has(done, 3), what="3 outcomes")
        sent = dict(h.mocks["a"].by_message)
    assert statuses[expiring]["status"] == "expired"
    assert statuses[cancelled]["status"] == "cancelled"
    assert statuses[blocker]["status"] == "completed"
    assert set(sent) == {blocker}
    assert await done() == {blocker: "completed", expiring: "expired", cancelled: "cancelled"}


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


DIRECT = {"LLMQ_SCHEDULER__DIRECT_ADMISSION": "true", "LLMQ_SCHEDULER__STAGGER": "false"}
"""Direct admission for every level (with the stagger on, only for the levels it never holds back)."""
NO_SCHEDULER = ("dispatch", "retry")


async def test_a_lone_message_at_idle_is_admitted_by_its_submission(redis: aioredis.Redis, keys: Keys) -> None:
    # Given an idle queue with dispatch running and no scheduler at all
    async with Harness(redis, keys, backends={"a": MockSettings(latency_ms=1)}, stages=NO_SCHEDULER, env=DIRECT) as h:
        # When one message comes
        mid = await h.submit()
        # Then it is admitted at once (its slot held), never put in its level, and is answered
        status = (await h.wait_terminal([mid], within=10))[mid]
        assert await redis.xlen(keys.level("normal")) == 0
    assert status["status"] == "completed" and float(status["scheduled_at"]) >= float(status["enqueued_at"])


async def test_with_anything_waiting_a_message_waits_its_turn(redis: aioredis.Redis, keys: Keys) -> None:
    # Given a low message waiting in its level (queued by the batch route, which never admits directly)
    async with Harness(redis, keys, backends={"a": MockSettings(latency_ms=1)}, stages=(), env=DIRECT) as h:
        response = await h.http.post("/api/v1/messages/batch", json=[{"level": "low", "request": CHAT}])
        assert response.json()[0]["status_code"] == 202
        # When a lone realtime message comes, then it is queued too: admission is the scheduler's alone
        mid = await h.submit("realtime")
        assert (await h.status(mid))["status"] == "queued" and await redis.xlen(keys.level("realtime")) == 1
        assert await redis.xlen(keys.dispatch) == 0


@pytest.mark.parametrize("realtime_seen_s_ago", [5.0, 11.0, None])
async def test_a_direct_admission_keeps_the_slots_reserved_for_higher_levels_while_they_are_active(
    redis: aioredis.Redis, keys: Keys, realtime_seen_s_ago: float | None
) -> None:
    # Given two backend slots, one kept for realtime while it had a message in the last 10 s, and no scheduler
    levels = (
        "[{name: realtime, priority: 1, max_wait_time: 100ms, max_concurrent: 2, reserved: 1},"
        " {name: low, priority: 4, max_wait_time: 120s, max_concurrent: 2}]"
    )
    env = DIRECT | {"LLMQ_QUEUE__LEVELS": levels, "LLMQ_SCHEDULER__RESERVE_WINDOW": "10s"}
    config = {"a": {"max_concurrent": 2}}
    if realtime_seen_s_ago is not None:
        await redis.hset(keys.active, "realtime", time.time() - realtime_seen_s_ago)
    async with Harness(redis, keys, backends={"a": MockSettings()}, backend_config=config, stages=(), env=env) as h:
        # When two lone low messages come to the idle queue
        first, second = await h.submit("low"), await h.submit("low")
        # Then the first takes the free slot at once; the second waits while the other slot is realtime's
        active = realtime_seen_s_ago is not None and realtime_seen_s_ago < 10
        assert (await h.status(first))["status"] == "scheduled"
        assert (await h.status(second))["status"] == ("queued" if active else "scheduled")
        assert await redis.zcard(keys.inflight("low")) == (1 if active else 2)
        # and the submissions record when low was last active
        assert time.time() - float(await redis.hget(keys.active, "low")) < 5  # type: ignore[arg-type]


async def test_a_paused_level_keeps_its_messages_waiting_until_it_is_resumed(redis: aioredis.Redis, keys: Keys) -> None:
    async with Harness(redis, keys, backends={"a": MockSettings(latency_ms=5)}) as h:
        # Given low paused for maintenance
        await pausing.pause(redis, keys, ["low"], "maintenance")
        # When low and normal messages arrive
        low = [await h.submit("low") for _ in range(3)]
        normal = [await h.submit("normal") for _ in range(3)]
        # Then normal completes while low waits, admitted neither by the scheduler nor directly
        assert {s["status"] for s in (await h.wait_terminal(normal)).values()} == {"completed"}
        await asyncio.sleep(0.3)  # (nothing may happen to low: observed for a while)
        assert {(await h.status(i))["status"] for i in low} == {"queued"}
        # When the whole queue is paused as well, and low resumed, low still waits
        await pausing.pause(redis, keys, [pausing.EVERY], "")
        await pausing.resume(redis, keys, ["low"])
        await asyncio.sleep(0.3)
        assert {(await h.status(i))["status"] for i in low} == {"queued"}
        # When the queue is resumed, low completes
        await pausing.resume(redis, keys, [pausing.EVERY])
        assert {s["status"] for s in (await h.wait_terminal(low)).values()} == {"completed"}


async def test_a_lone_message_of_a_paused_level_is_not_admitted_directly(redis: aioredis.Redis, keys: Keys) -> None:
    async with Harness(redis, keys, backends={"a": MockSettings()}, stages=(), env=DIRECT) as h:
        await pausing.pause(redis, keys, ["low"], "")
        other, paused = await h.submit("normal"), await h.submit("low")
        assert (await h.status(other))["status"] == "scheduled"  # (nothing waited: admitted at once)
        assert (await h.status(paused))["status"] == "queued"  # (nothing waited either, but low is paused)
