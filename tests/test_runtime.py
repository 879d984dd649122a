"""The shared consumer loop on a real server: ack, reclaim after SIGKILL, poison, leases, drain, sharing."""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import httpx
import msgspec
import pytest
import redis.asyncio as aioredis
from redis.exceptions import OutOfMemoryError, ReadOnlyError, ResponseError

from llmq.pipeline import background, transitions
from llmq.pipeline.keys import Keys
from llmq.pipeline.models import FIELD, Outcome, Status, decode_outcome, new_id
from llmq.pipeline.runtime.effects import Commit, xadd
from llmq.pipeline.runtime.runner import Runner
from llmq.pipeline.runtime.streams import ensure_group, parse_entries
from llmq.pipeline.submit import new_message
from tests.conftest import eventually
from tests.support.harness import CHAT
from tests.support.procs import worker
from tests.support.runner import add_jobs, ids, make_runner, pending_count, running, settings
from tests.support.worker import RecordingStage


async def test_handled_entries_are_acked(redis: aioredis.Redis, keys: Keys) -> None:
    # Given 50 entries in a stream
    stream = keys.level("normal")
    await add_jobs(redis, stream, [{"id": f"j{i}"} for i in range(50)])
    runner = make_runner(redis, keys, stream, "c1")
    # When a consumer runs
    async with running(runner):
        await eventually(lambda: _len_is(redis, f"{stream}:handled", 50), what="50 handled")
    # Then each was handled once and nothing is pending
    assert sorted(await ids(redis, f"{stream}:handled")) == sorted(f"j{i}" for i in range(50))
    assert await pending_count(redis, stream) == 0


async def _len_is(redis: aioredis.Redis, key: str, n: int) -> bool:
    return int(await redis.llen(key)) >= n


async def test_group_creation_is_idempotent(redis: aioredis.Redis, keys: Keys) -> None:
    stream = keys.level("high")
    runner = make_runner(redis, keys, stream, "c1")
    await runner.ensure_group()
    await runner.ensure_group()  # BUSYGROUP is fine
    groups: Any = await redis.xinfo_groups(stream)
    assert [g["name"] for g in groups] == [b"work"]


async def test_restarted_consumer_rereads_its_own_pending_first(redis: aioredis.Redis, keys: Keys) -> None:
    # Given entries delivered to consumer c1 that died before acking (simulated by a bare XREADGROUP)
    stream = keys.level("normal")
    await redis.xgroup_create(stream, "work", id="0", mkstream=True)
    await add_jobs(redis, stream, [{"id": "old1"}, {"id": "old2"}])
    await redis.xreadgroup("work", "c1", {stream: ">"}, count=10)
    await add_jobs(redis, stream, [{"id": "new1"}])
    # When c1 starts again
    async with running(make_runner(redis, keys, stream, "c1", batch_size=1, max_in_hand=1)):
        await eventually(lambda: _len_is(redis, f"{stream}:handled", 3), what="3 handled")
    # Then it handled its own pending entries before the new one
    assert await ids(redis, f"{stream}:handled") == ["old1", "old2", "new1"]
    assert await pending_count(redis, stream) == 0


async def test_a_restarted_consumer_pages_through_its_own_pending_entries_once_each(
    redis: aioredis.Redis, keys: Keys
) -> None:
    # Given 25 slow entries delivered once to consumer c1, which died (a bare XREADGROUP), and no other consumer
    stream = keys.level("normal")
    await redis.xgroup_create(stream, "work", id="0", mkstream=True)
    await add_jobs(redis, stream, [{"id": f"p{i:02d}", "sleep": 0.3} for i in range(25)])
    await redis.xreadgroup("work", "c1", {stream: ">"}, count=25)
    # When c1 starts again, reading 10 at a time while holding up to 20, long before any claim timeout
    runner = make_runner(redis, keys, stream, "c1", batch_size=10, max_in_hand=20, max_deliveries=2, claim_timeout_s=60)
    async with running(runner):
        await eventually(lambda: _len_is(redis, f"{stream}:handled", 25), within=10, what="25 handled")
    # Then it re-read every one of them, past the first page, and each counted one more delivery only (2, not
    # the 3 that re-reading the entries it held would have made poison)
    assert sorted(await ids(redis, f"{stream}:handled")) == [f"p{i:02d}" for i in range(25)]
    assert sorted(await ids(redis, f"{stream}:started")) == [f"p{i:02d}" for i in range(25)]
    assert await redis.xlen(keys.dlq) == 0
    assert await pending_count(redis, stream) == 0


async def test_three_restarts_do_not_make_an_entry_poison(redis: aioredis.Redis, keys: Keys) -> None:
    # Given an entry whose consumer dies three times while holding it (max_deliveries 5)
    stream = keys.level("normal")
    await redis.xgroup_create(stream, "work", id="0", mkstream=True)
    await add_jobs(redis, stream, [{"id": "held"}, *({"id": f"x{i}", "sleep": 0.2} for i in range(12))])
    await redis.xreadgroup("work", "c1", {stream: ">"}, count=13)
    for _ in range(3):
        restarted = make_runner(redis, keys, stream, "c1", batch_size=5, max_deliveries=5)
        await restarted._read_own(5)  # a restart's first read, then death
    # When it starts a fourth time and runs
    async with running(make_runner(redis, keys, stream, "c1", batch_size=5, max_deliveries=5)):
        await eventually(lambda: _len_is(redis, f"{stream}:handled", 13), what="13 handled")
    # Then it was handled, not dead-lettered: each restart counted one delivery
    assert await redis.xlen(keys.dlq) == 0


async def test_a_deleted_stream_is_recreated_and_the_consumer_goes_on(redis: aioredis.Redis, keys: Keys) -> None:
    # Given a consumer running on its stream
    stream = keys.level("normal")
    async with running(make_runner(redis, keys, stream, "c1")) as task:
        await add_jobs(redis, stream, [{"id": "before"}])
        await eventually(lambda: _len_is(redis, f"{stream}:handled", 1), what="first handled")
        # When the stream (and its group) is deleted under it, as when Redis restarts without its data
        await redis.delete(stream)
        await eventually(lambda: _has_group(redis, stream), what="the group created again")
        await add_jobs(redis, stream, [{"id": "after"}])
        # Then it recreates the group and handles what comes next, without crashing
        await eventually(lambda: _len_is(redis, f"{stream}:handled", 2), what="second handled")
        assert not task.done()
    assert await ids(redis, f"{stream}:handled") == ["before", "after"]


async def _has_group(redis: aioredis.Redis, stream: str) -> bool:
    try:
        return bool(await redis.xinfo_groups(stream))
    except ResponseError:
        return False


async def test_entries_of_a_consumer_whose_lease_expired_are_taken_over_at_once(
    redis: aioredis.Redis, keys: Keys
) -> None:
    # Given entries held by a consumer that has no lease any more (its pod was replaced under a new name)
    stream = keys.level("normal")
    await redis.xgroup_create(stream, "work", id="0", mkstream=True)
    await add_jobs(redis, stream, [{"id": f"o{i}"} for i in range(3)])
    await redis.xreadgroup("work", "old-pod-1", {stream: ">"}, count=3)
    # When a consumer that takes over dead consumers' entries runs, with a claim timeout of a minute
    runner = make_runner(redis, keys, stream, "new-pod-1", claim_timeout_s=60, consumer_lease_s=0.5)
    async with running(runner):
        # Then it handles them within seconds, not after the claim timeout
        await eventually(lambda: _len_is(redis, f"{stream}:handled", 3), within=8, what="3 handled")
    assert sorted(await ids(redis, f"{stream}:handled")) == ["o0", "o1", "o2"]


async def test_a_consumer_with_a_live_lease_keeps_its_entries(redis: aioredis.Redis, keys: Keys) -> None:
    stream = keys.level("normal")
    await redis.xgroup_create(stream, "work", id="0", mkstream=True)
    await add_jobs(redis, stream, [{"id": "mine"}])
    await redis.xreadgroup("work", "alive-1", {stream: ">"}, count=1)
    await redis.set(keys.consumer_lease("work", "alive-1"), "token", px=60_000)
    runner = make_runner(redis, keys, stream, "other-1", claim_timeout_s=60, consumer_lease_s=0.5)
    assert await runner.reclaimer.claim_dead(10) == []
    assert await pending_count(redis, stream) == 1


async def test_poison_entry_is_dead_lettered_with_reason(redis: aioredis.Redis, keys: Keys) -> None:
    # Given an entry whose handling always fails and a good one
    stream = keys.level("normal")
    await add_jobs(redis, stream, [{"id": "bad", "fail": True}])
    await add_jobs(redis, stream, [{"id": "good"}])
    runner = make_runner(redis, keys, stream, "c1", batch_size=1, max_in_hand=1, max_deliveries=2)
    # When the consumer runs past the delivery cap
    async with running(runner):
        await eventually(lambda: _xlen_is(redis, keys.dlq, 1), within=20, what="a dead letter")
        await eventually(lambda: _len_is(redis, f"{stream}:handled", 1), what="good handled")
    # Then the bad entry is in the dead-letter stream with its reason, acked; the good one was handled
    [(_, fields)] = await redis.xrange(keys.dlq)
    assert msgspec.msgpack.decode(fields[FIELD]) == {"id": "bad", "fail": True}
    assert b"delivered 3 times" in fields[b"reason"]
    assert fields[b"stream"].decode() == stream
    assert await ids(redis, f"{stream}:handled") == ["good"]
    assert await pending_count(redis, stream) == 0


async def test_a_poison_message_ends_on_record_as_dead(redis: aioredis.Redis, keys: Keys) -> None:
    # Given a message whose handling always fails
    stream = keys.level("normal")
    msg = new_message(message_id=new_id(), level="normal", request={"messages": []})
    await add_jobs(redis, stream, [{**msgspec.to_builtins(msg), "fail": True}])
    runner = make_runner(redis, keys, stream, "c1", batch_size=1, max_in_hand=1, max_deliveries=2)
    # When it is dead-lettered as poison
    async with running(runner):
        await eventually(lambda: _xlen_is(redis, keys.done, 1), within=20, what="an outcome")
    # Then its end is recorded like any other: status dead, and an outcome for the archive
    [(_, fields)] = await redis.xrange(keys.done)
    outcome = decode_outcome(fields[FIELD])
    assert outcome.status is Status.DEAD and outcome.message.id == msg.id
    assert outcome.error == "poison: delivered 3 times (max_deliveries 2)"
    assert await redis.hget(keys.msg(msg.id), "status") == b"dead"
    assert await redis.xlen(keys.dlq) == 1


async def _xlen_is(redis: aioredis.Redis, stream: str, n: int) -> bool:
    return int(await redis.xlen(stream)) >= n


async def test_long_handler_renews_its_lease_and_is_not_reclaimed(redis: aioredis.Redis, keys: Keys) -> None:
    # Given a job that takes 3x the claim timeout, and a second consumer reclaiming idle entries
    stream = keys.level("normal")
    await add_jobs(redis, stream, [{"id": "slow", "sleep": 3.0}])
    slow_owner = make_runner(redis, keys, stream, "owner", claim_timeout_s=1.0)
    thief = make_runner(redis, keys, stream, "thief", claim_timeout_s=1.0)
    async with running(slow_owner):
        await eventually(lambda: _len_is(redis, f"{stream}:started", 1), what="slow job started")
        # When the other consumer runs its reclaimer throughout the slow call
        async with running(thief):
            await eventually(lambda: _len_is(redis, f"{stream}:handled", 1), within=10, what="slow job done")
    # Then the job was started once, by its owner, and never stolen
    assert await ids(redis, f"{stream}:started") == ["slow"]
    assert thief.handled == 0 and slow_owner.handled == 1


async def test_a_stopping_consumer_keeps_renewing_what_it_drains(redis: aioredis.Redis, keys: Keys) -> None:
    # Given a consumer in a job that takes 3x the claim timeout, and another consumer reclaiming idle entries
    stream = keys.level("normal")
    await add_jobs(redis, stream, [{"id": "slow", "sleep": 3.0}])
    owner = make_runner(redis, keys, stream, "owner", claim_timeout_s=1.0)
    thief = make_runner(redis, keys, stream, "thief", claim_timeout_s=1.0)
    owner_task = asyncio.create_task(owner.run())
    await eventually(lambda: _len_is(redis, f"{stream}:started", 1), what="slow job started")
    async with running(thief):
        # When the owner is told to stop (SIGTERM) and drains its job through its grace period
        owner.stop()
        await asyncio.wait_for(owner_task, timeout=10)
    # Then its lease was renewed while it drained: the job ran once, by its owner
    assert await ids(redis, f"{stream}:started") == ["slow"]
    assert await ids(redis, f"{stream}:handled") == ["slow"]
    assert thief.handled == 0


async def test_entry_of_a_stalled_consumer_is_reclaimed(redis: aioredis.Redis, keys: Keys) -> None:
    # Given an entry delivered to a consumer that stopped renewing (it died without running its loop)
    stream = keys.level("normal")
    await redis.xgroup_create(stream, "work", id="0", mkstream=True)
    await add_jobs(redis, stream, [{"id": "orphan"}])
    await redis.xreadgroup("work", "dead", {stream: ">"}, count=1)
    # When a live consumer runs past the claim timeout
    async with running(make_runner(redis, keys, stream, "alive", claim_timeout_s=0.5)):
        await eventually(lambda: _len_is(redis, f"{stream}:handled", 1), what="orphan handled")
        # Then the dead consumer, now with nothing pending and no lease, is forgotten
        await eventually(lambda: _consumers_are(redis, stream, {"alive"}), what="dead consumer removed")
    assert await ids(redis, f"{stream}:handled") == ["orphan"]


async def _consumers_are(redis: aioredis.Redis, stream: str, names: set[str]) -> bool:
    consumers: Any = await redis.xinfo_consumers(stream, "work")
    return {c["name"].decode() for c in consumers} == names


async def test_consumer_with_a_live_lease_is_not_forgotten(redis: aioredis.Redis, keys: Keys) -> None:
    stream = keys.level("normal")
    await redis.xgroup_create(stream, "work", id="0", mkstream=True)
    await redis.xgroup_createconsumer(stream, "work", "idle-but-alive")
    await redis.set(keys.consumer_lease("work", "idle-but-alive"), "token", px=60_000)
    runner = make_runner(redis, keys, stream, "other", claim_timeout_s=0.2)
    await asyncio.sleep(0.3)  # let the idle consumer pass the claim timeout (nothing to await on)
    assert await runner.reclaimer.forget_dead_consumers() == []
    await redis.delete(keys.consumer_lease("work", "idle-but-alive"))
    assert await runner.reclaimer.forget_dead_consumers() == ["idle-but-alive"]


# --- real processes ---------------------------------------------------------------------------


async def test_entry_of_a_sigkilled_consumer_is_reclaimed_and_handled_once(
    redis: aioredis.Redis, keys: Keys, stage_env: dict[str, str]
) -> None:
    # Given a consumer process in the middle of a batch of slow jobs
    stream = keys.level("normal")
    await add_jobs(redis, stream, [{"id": f"k{i}", "sleep": 0.5} for i in range(5)])
    first = worker(stage_env, stream)
    try:
        await eventually(lambda: _len_is(redis, f"{stream}:started", 1), what="first worker started a job")
        # When it is SIGKILLed before committing
        first.kill()
        assert await redis.llen(f"{stream}:handled") == 0
        # Then another consumer reclaims the batch and handles every entry exactly once
        second = worker(stage_env, stream)
        try:
            await eventually(lambda: _len_is(redis, f"{stream}:handled", 5), within=30, what="all handled")
            second.signal(signal.SIGTERM)
            assert second.wait() == 0
        finally:
            second.kill()
    finally:
        first.kill()
    handled = await ids(redis, f"{stream}:handled")
    assert sorted(handled) == [f"k{i}" for i in range(5)]
    assert await pending_count(redis, stream) == 0
    # (taken over when the dead consumer's name lease expired, or after the claim timeout: both are 1 s here)
    taken = second.find("took over") or second.find("reclaimed")
    assert taken is not None, second.text()


async def test_sigterm_finishes_in_hand_work_and_exits_0(
    redis: aioredis.Redis, keys: Keys, stage_env: dict[str, str]
) -> None:
    # Given a consumer process handling a job that takes a while
    stream = keys.level("normal")
    await add_jobs(redis, stream, [{"id": "inhand", "sleep": 1.0}])
    proc = worker(stage_env, stream)
    try:
        await eventually(lambda: _len_is(redis, f"{stream}:started", 1), what="job started")
        # When it receives SIGTERM mid-job
        proc.signal(signal.SIGTERM)
        # Then it finishes and commits the job, exits 0 and logs one summary line
        assert proc.wait() == 0, proc.text()
    finally:
        proc.kill()
    assert await ids(redis, f"{stream}:handled") == ["inhand"]
    assert await pending_count(redis, stream) == 0
    summary = proc.find("stage stopped")
    assert summary is not None and summary["handled"] == 1
    # and released its consumer name for the next process
    assert await redis.keys(f"{keys.prefix}:consumer:*") == []


async def test_second_signal_exits_at_once(redis: aioredis.Redis, keys: Keys, stage_env: dict[str, str]) -> None:
    stream = keys.level("normal")
    await add_jobs(redis, stream, [{"id": "stuck", "sleep": 60}])
    proc = worker(stage_env, stream)
    try:
        await eventually(lambda: _len_is(redis, f"{stream}:started", 1), what="job started")
        proc.signal(signal.SIGTERM)
        proc.wait_for_log("SIGTERM: stopping")
        proc.signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 130
    finally:
        proc.kill()
    assert await redis.llen(f"{stream}:handled") == 0
    assert await pending_count(redis, stream) == 1  # left pending for a restart or a reclaim


async def test_two_consumers_share_a_stream_without_handling_twice(
    redis: aioredis.Redis, keys: Keys, stage_env: dict[str, str]
) -> None:
    # Given two consumer processes in one group (auto-named on the same host)
    stream = keys.level("normal")
    procs = [worker(stage_env, stream), worker(stage_env, stream)]
    try:
        for p in procs:
            p.wait_for_log("stage started")
        names = {p.find("stage started")["consumer"] for p in procs}  # type: ignore[index]
        assert len(names) == 2
        # When 600 jobs arrive
        await add_jobs(redis, stream, [{"id": f"s{i}", "sleep": 0.002} for i in range(600)])
        await eventually(lambda: _len_is(redis, f"{stream}:handled", 600), within=30, what="600 handled")
        for p in procs:
            p.signal(signal.SIGTERM)
        assert [p.wait() for p in procs] == [0, 0]
    finally:
        for p in procs:
            p.kill()
    # Then every job was handled exactly once, and both consumers took part
    handled = await redis.lrange(f"{stream}:handled", 0, -1)
    assert sorted(v.decode().split(":")[0] for v in handled) == sorted(f"s{i}" for i in range(600))
    assert len({v.decode().split(":")[1] for v in handled}) == 2


async def test_stage_process_serves_health_and_metrics(
    redis: aioredis.Redis, keys: Keys, stage_env: dict[str, str]
) -> None:
    stream = keys.level("normal")
    proc = worker(stage_env, stream)
    try:
        port = proc.wait_for_log("stage started")["ops_port"]
        await add_jobs(redis, stream, [{"id": "m1"}])
        await eventually(lambda: _len_is(redis, f"{stream}:handled", 1), what="handled")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            health = (await http.get("/health")).json()
            metrics = (await http.get("/metrics")).text
    finally:
        proc.signal(signal.SIGTERM)
        proc.wait()
    assert health["status"] == "ok" and health["checks"] == {"redis": "ok"}
    assert health["stage"] == "work" and health["handled"] == 1
    assert 'llmq_stage_entries_total{outcome="acked",stage="work"} 1.0' in metrics


async def test_sigusr1_reopens_the_log_file(
    redis: aioredis.Redis, keys: Keys, stage_env: dict[str, str], tmp_path: Any
) -> None:
    # Given a stage logging to a file
    log_file = tmp_path / "stage.log"
    env = {**stage_env, "LLMQ_LOGGING__OUTPUT": str(log_file)}
    proc = worker(env, keys.level("normal"))
    try:
        await eventually(lambda: _file_has(log_file, "stage started"), what="start logged")
        # When logrotate moves the file away and sends SIGUSR1
        rotated = tmp_path / "stage.log.1"
        log_file.rename(rotated)
        proc.signal(signal.SIGUSR1)
        await eventually(lambda: _exists(log_file), what="log file reopened")
        proc.signal(signal.SIGTERM)
        assert proc.wait() == 0
    finally:
        proc.kill()
    # Then later lines go to the new file, not the rotated one
    assert "stage stopped" in log_file.read_text()
    assert "stage stopped" not in rotated.read_text()


async def _file_has(path: Any, text: str) -> bool:
    return bool(path.exists() and text in path.read_text())


async def _exists(path: Any) -> bool:
    return bool(path.exists())


@pytest.mark.parametrize("explicit", [True, False])
async def test_consumer_names_are_unique_and_reused_after_release(
    redis: aioredis.Redis, keys: Keys, explicit: bool
) -> None:
    from llmq.pipeline.errors import ConsumerNameTaken
    from llmq.pipeline.runtime.names import ConsumerLease

    a = ConsumerLease(redis=redis, keys=keys, group="work", ttl_s=10)
    b = ConsumerLease(redis=redis, keys=keys, group="work", ttl_s=10)
    if explicit:
        assert await a.acquire("named") == "named"
        with pytest.raises(ConsumerNameTaken, match="'named'"):
            await b.acquire("named")
        await a.release()
        assert await b.acquire("named") == "named"
    else:
        first, second = await a.acquire(None), await b.acquire(None)
        assert first.endswith("-1") and second.endswith("-2")
        await a.release()
        c = ConsumerLease(redis=redis, keys=keys, group="work", ttl_s=10)
        assert await c.acquire(None) == first  # a restarted replica gets its name back


async def test_a_loop_waiting_on_an_event_stops_when_cancelled_as_the_event_fires() -> None:
    """The race that hung test teardowns: on Python 3.11 ``asyncio.wait_for`` swallowed a cancel that
    arrived just as the event was set, so the arbiter's loop outlived ``cancel()``."""
    event = asyncio.Event()

    async def loop() -> None:
        while True:
            await background.wait_event(event, 0.1)
            event.clear()

    for _ in range(20):
        task = asyncio.create_task(loop())
        await asyncio.sleep(0.005)
        event.set()
        await asyncio.sleep(0)  # the event's waiter completes; the loop has not resumed yet
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=1.0)
        assert done and task.cancelled()
    assert not await background.wait_event(asyncio.Event(), 0.01)


async def test_a_task_that_swallows_a_cancellation_is_cancelled_again() -> None:
    """What redis-py can do: a cancelled read surfaces as a ConnectionError, and a loop that retries on
    connection errors would go on forever after a single cancel()."""
    swallowed = 0

    async def loop() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                if swallowed == 0:
                    swallowed += 1
                    asyncio.current_task().uncancel()  # type: ignore[union-attr]
                    continue
                raise

    task = asyncio.create_task(loop())
    await asyncio.sleep(0.05)
    stopping = asyncio.create_task(background.cancel(task))
    done, _ = await asyncio.wait({stopping}, timeout=5)
    assert done, "cancel() waited on a task that went on"
    assert task.cancelled() and swallowed == 1


# --- what the hostile review of issue 16 found ------------------------------------------------------------


class HoldingStage(RecordingStage):
    """Holds every entry until shutdown, then gives it back unhandled (as a scheduler's intake does with what
    waits for admission)."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self._stop = asyncio.Event()

    async def handle(self, batch: Any) -> None:
        await self._stop.wait()

    def on_stop(self) -> None:
        self._stop.set()


async def test_clean_restarts_of_a_holding_consumer_never_make_poison(redis: aioredis.Redis, keys: Keys) -> None:
    # Given entries held by a consumer that is stopped cleanly six times (max_deliveries 3)
    stream = keys.level("normal")
    await add_jobs(redis, stream, [{"id": f"w{i}"} for i in range(5)])
    for _ in range(6):
        stage = HoldingStage(redis=redis, stream=stream, group="work")
        runner = Runner(stage, redis=redis, keys=keys, consumer="c1", settings=settings(max_deliveries=3))
        async with running(runner):
            await eventually(lambda r=runner: _holds(r, 5), what="5 held")  # type: ignore[misc]
    # Then none is dead-lettered: a delivery handed back unhandled is not counted
    assert await redis.xlen(keys.dlq) == 0
    rows: Any = await redis.xpending_range(stream, "work", "-", "+", 10)
    assert [r["times_delivered"] for r in rows] == [0] * 5


async def _holds(runner: Runner, n: int) -> bool:
    return len(runner.in_hand) >= n


async def test_a_failed_commit_of_a_replica_is_retried_not_dropped(
    redis: aioredis.Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a consumer whose first commit meets a failover (READONLY)
    stream = keys.level("normal")
    await add_jobs(redis, stream, [{"id": f"f{i}"} for i in range(3)])
    runner = make_runner(redis, keys, stream, "c1")
    script = runner.commit._script
    calls = 0

    async def failing_over(keys_: Any, args: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ReadOnlyError("READONLY You can't write against a read only replica.")
        return await script(keys_, args)

    monkeypatch.setattr(runner.commit, "_script", failing_over)
    # When it handles them, then the commit is made again, and each entry is handled once
    async with running(runner):
        await eventually(lambda: _len_is(redis, f"{stream}:handled", 3), what="3 handled")
    assert sorted(await ids(redis, f"{stream}:started")) == ["f0", "f1", "f2"]
    assert await pending_count(redis, stream) == 0


async def test_after_an_outage_dead_consumers_are_taken_over_only_after_a_whole_lease(
    redis: aioredis.Redis, keys: Keys
) -> None:
    # Given entries of a consumer with no lease, and a consumer that has just (re)connected: after an outage
    # every lease has lapsed, the live ones' too, until they refresh them
    stream = keys.level("normal")
    await redis.xgroup_create(stream, "work", id="0", mkstream=True)
    await add_jobs(redis, stream, [{"id": "o"}])
    await redis.xreadgroup("work", "other-1", {stream: ">"}, count=1)
    runner = make_runner(redis, keys, stream, "me-1", claim_timeout_s=60, consumer_lease_s=2.0)
    async with running(runner):
        # Then for a whole lease it takes nothing (the other may be refreshing its lease)
        await asyncio.sleep(1.2)
        assert await redis.llen(f"{stream}:handled") == 0
        # and then it takes the entries over
        await eventually(lambda: _len_is(redis, f"{stream}:handled", 1), within=5, what="taken over")


async def test_a_consumer_that_read_after_the_check_is_not_forgotten(
    redis: aioredis.Redis, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a consumer seen idle with nothing pending, which then restarts under its name and reads an entry
    stream = keys.level("normal")
    await redis.xgroup_create(stream, "work", id="0", mkstream=True)
    await redis.xgroup_createconsumer(stream, "work", "back-1")
    runner = make_runner(redis, keys, stream, "other", claim_timeout_s=0.05)
    await asyncio.sleep(0.1)
    seen = await redis.xinfo_consumers(stream, "work")
    await add_jobs(redis, stream, [{"id": "fresh"}])
    await redis.xreadgroup("work", "back-1", {stream: ">"}, count=1)

    async def stale(*_: Any) -> Any:
        return seen

    monkeypatch.setattr(runner.reclaimer.redis, "xinfo_consumers", stale)
    # When the other consumer forgets the dead ones on what it saw
    assert await runner.reclaimer.forget_dead_consumers() == []
    # Then the entry it read is still pending (XGROUP DELCONSUMER would have dropped it)
    assert await pending_count(redis, stream) == 1


async def test_taking_over_stops_when_the_owner_took_its_lease_back(redis: aioredis.Redis, keys: Keys) -> None:
    stream = keys.level("normal")
    await redis.xgroup_create(stream, "work", id="0", mkstream=True)
    await add_jobs(redis, stream, [{"id": "mine"}])
    reply = await redis.xreadgroup("work", "owner-1", {stream: ">"}, count=1)
    entry_id = reply[0][1][0][0].decode()
    lease = keys.consumer_lease("work", "owner-1")
    await redis.set(lease, "token", px=60_000)  # restarted under its name, re-reading its own entries
    runner = make_runner(redis, keys, stream, "other-1")
    assert await runner.reclaimer.take([entry_id], owner="owner-1", lease=lease) == []


class _RefusingStage(RecordingStage):
    """Fails its first handlings as a full Redis would (OOM), before it has done anything."""

    def __init__(self, refusals: int, **kw: Any) -> None:
        super().__init__(**kw)
        self.refusals = refusals

    async def handle(self, batch: Any) -> None:
        if self.refusals:
            self.refusals -= 1
            raise OutOfMemoryError("command not allowed when used memory > 'maxmemory'.")
        await super().handle(batch)


async def _llen(redis: aioredis.Redis, key: str, n: int) -> bool:
    return int(await redis.llen(key)) >= n


async def _has_error(runner: Runner) -> bool:
    return runner.redis_error is not None


async def test_a_cancel_acknowledged_before_an_end_decided_meanwhile_wins(redis: aioredis.Redis, keys: Keys) -> None:
    # Given a message that expired while it waited, and a client whose DELETE was answered "cancelled" meanwhile
    msg = new_message(message_id=new_id(), level="normal", request=CHAT)
    await redis.hset(keys.msg(msg.id), mapping={"status": "cancelled"})
    expired = Outcome(message=msg, status=Status.EXPIRED, finished_at=time.time())
    commit = Commit(redis, stream=keys.level("normal"), group="schedule", channel=keys.finished, dlq=keys.dlq)
    # When the end is recorded
    await commit([("", [transitions.ended(keys, expired, retention_s=60, cancellable=True)])])
    # Then the message stays cancelled, and the archive gets a cancelled outcome
    assert await redis.hget(keys.msg(msg.id), "status") == b"cancelled"
    [(_, fields)] = await redis.xrange(keys.done)
    assert decode_outcome(fields[FIELD]).status is Status.CANCELLED


async def test_a_batch_that_meets_a_full_redis_is_handled_again_without_counting_deliveries(
    redis: aioredis.Redis, keys: Keys
) -> None:
    # Given entries whose handling meets a full Redis five times, where one more delivery makes poison
    stream = keys.level("normal")
    await add_jobs(redis, stream, [{"id": f"o{i}"} for i in range(3)])
    stage = _RefusingStage(5, redis=redis, stream=stream, group="work")
    runner = Runner(stage, redis=redis, keys=keys, consumer="c1", settings=settings(max_deliveries=1))
    # When it runs, then each is handled once, and none is poison
    task = asyncio.create_task(runner.run())
    try:
        await eventually(lambda: _llen(redis, f"{stream}:handled", 3), what="3 handled")
    finally:
        runner.stop()
        await task
    assert await redis.xlen(keys.dlq) == 0 and stage.refusals == 0


async def test_an_effect_that_fails_dead_letters_its_entry_not_loses_it(redis: aioredis.Redis, keys: Keys) -> None:
    # Given an entry whose hand-off goes to a key of another type (two deployments on one prefix, say)
    stream = keys.level("normal")
    await add_jobs(redis, stream, [{"id": "x"}])
    await ensure_group(redis, stream, "work")
    reply = await redis.xreadgroup("work", "c1", {stream: ">"})
    [entry] = parse_entries(reply[0][1])
    await redis.set(keys.dispatch, "not a stream")
    commit = Commit(redis, stream=stream, group="work", channel=keys.finished, dlq=keys.dlq)
    # When it is committed, then it goes to the dead-letter stream with the error, on record, not vanish
    # acked with its hand-off undone
    assert await commit([(entry.id, [xadd(keys.dispatch, b"m")])]) == [True]
    [(_, letter)] = await redis.xrange(keys.dlq)
    assert b"WRONGTYPE" in letter[b"reason"] and msgspec.msgpack.decode(letter[FIELD]) == {"id": "x"}


async def test_a_read_loop_refused_for_good_shows_in_its_health(redis: aioredis.Redis, keys: Keys) -> None:
    # Given a stream key that holds a string (a collision with another deployment's key)
    stream = keys.level("normal")
    await redis.set(stream, "not a stream")
    runner = make_runner(redis, keys, stream, "c1")
    task = asyncio.create_task(runner.run())
    try:
        # Then the consumer does not crash: it says what Redis answers, for health to show
        await eventually(lambda: _has_error(runner), what="the error recorded")
        assert not task.done()
    finally:
        runner.stop()
        await task
    assert "WRONGTYPE" in (runner.redis_error or "")
