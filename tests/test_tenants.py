"""Tenants: who a request's tenant is (its API key's, or the one it names), their fair shares of a level by
estimated tokens, and their quotas (max_queued, rpm, tpm) refused with 429 naming the quota."""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from llmq.pipeline.config import ConfigError, load_config, read_config
from llmq.pipeline.dlq import DeadLetters
from llmq.pipeline.keyfile import read_key_file
from llmq.pipeline.keys import Keys
from llmq.pipeline.lua import Lua
from llmq.pipeline.models import FIELD, decode_message, encode, new_id
from llmq.pipeline.runtime.streams import Entry
from llmq.pipeline.submit import Submission, Submitter, new_message
from llmq.stages.mock_backend import MockSettings
from llmq.stages.schedule.arbiter import Candidate, Decisions
from llmq.stages.schedule.fair import LevelQueue
from tests.support.clients import QUEUEING, client_for
from tests.support.harness import CHAT, Harness

TENANTS = "[{name: acme, api_keys: [k-acme]}, {name: slow, max_queued: 3}, {name: paced, rpm: 5}]"
QUOTAS = "[{name: slow, max_queued: 3}, {name: paced, rpm: 5}]"


def _cand(tenant: str | None, at: float, cost: float = 1.0) -> Candidate:
    msg = new_message(message_id=new_id(), level="normal", request=CHAT, tenant=tenant)
    msg.enqueued_at = at
    decisions: Decisions = asyncio.Queue()
    return Candidate(Entry(f"{int(at * 1000)}-0", b""), msg, decisions, cost)


async def _tenants_queued(redis: aioredis.Redis, keys: Keys, level: str = "normal") -> list[str | None]:
    return [decode_message(fields[FIELD]).tenant for _, fields in await redis.xrange(keys.level(level))]


# --- Fair shares --------------------------------------------------------------------------------------------


def test_tenants_waiting_together_take_turns_whatever_the_order_they_came_in() -> None:
    # Given 10 messages of a flooding tenant read before 3 of another, none admitted yet for either
    queue = LevelQueue()
    queue.extend([_cand("a", i) for i in range(10)] + [_cand("b", 100 + i) for i in range(3)])
    # Then the first six admissions alternate between them
    assert [c.message.tenant for c in queue.order(6, 0.0, {})] == ["a", "b", "a", "b", "a", "b"]


def test_shares_are_counted_in_tokens_not_in_messages() -> None:
    # Given a tenant whose messages cost 4 times the tokens of the other's
    queue = LevelQueue()
    queue.extend(
        [_cand("big", i, cost=400) for i in range(10)] + [_cand("small", 100 + i, cost=100) for i in range(20)]
    )
    # Then the small one gets 4 admissions for each of the big one's
    picks = [c.message.tenant for c in queue.order(15, 0.0, {})]
    assert picks.count("small") == 12 and picks.count("big") == 3


def test_a_tenant_behind_in_virtual_time_catches_up_but_a_newcomer_gets_no_credit() -> None:
    queue = LevelQueue()
    queue.extend([_cand("ahead", i) for i in range(5)] + [_cand("behind", 10 + i) for i in range(5)])
    queue.extend([_cand("new", 20 + i) for i in range(5)])
    # Given "ahead" admitted for 3 more than the level's latest start, "behind" at the level's start,
    # and "new" never seen (a virtual time far behind would be a credit for the time it sent nothing)
    picks = [c.message.tenant for c in queue.order(6, 10.0, {"ahead": 13.0, "behind": 10.0})]
    # Then behind and the newcomer share the turns until they reach "ahead"
    assert picks[:6].count("ahead") == 0 and set(picks) == {"behind", "new"}


def test_removing_decided_candidates_and_overdue_ones_keeps_the_count() -> None:
    queue = LevelQueue()
    cands = [_cand("a", 1), _cand("b", 2), _cand("a", 3)]
    cands[2].message.deadline = 5.0
    queue.extend(cands)
    queue.remove(cands[0])
    assert len(queue) == 2 and [c.message.tenant for c in queue.order(5, 0, {})] == ["b", "a"]
    assert queue.overdue(6.0) == [cands[2]] and len(queue) == 1 and list(queue) == [cands[1]]


async def test_a_flooding_tenant_does_not_hold_back_one_that_came_after_it(redis: aioredis.Redis, keys: Keys) -> None:
    # Given a level with 120 messages of tenant "a" queued before 20 of tenant "b", nothing admitted yet
    env = {"LLMQ_SCHEDULER__STAGGER": "false", **QUEUEING}
    async with Harness(redis, keys, backends={"x": MockSettings(latency_ms=5)}, env=env, stages=("retry",)) as h:
        ids = {"a": [await h.submit(tenant="a") for _ in range(120)]}
        ids["b"] = [await h.submit(tenant="b") for _ in range(20)]
    # When a scheduler and a dispatcher with 2 slots work through them
    backend = {"x": {"max_concurrent": 2}}
    async with Harness(redis, keys, backends={"x": MockSettings(latency_ms=5)}, env=env, backend_config=backend) as h:
        statuses = await h.wait_terminal(ids["a"] + ids["b"], within=60)
    # Then "b" had half of the first 40 admissions, not none (first in, first out would admit all of "a"'s first)
    order = sorted(statuses, key=lambda i: float(statuses[i]["scheduled_at"]))
    b_ids = set(ids["b"])
    assert sum(i in b_ids for i in order[:40]) >= 18
    assert {s["status"] for s in statuses.values()} == {"completed"}


async def test_virtual_times_move_with_each_admission_once(redis: aioredis.Redis, keys: Keys) -> None:
    # Given two tenants' messages admitted by the scheduler, with weights 1 and 3
    env = {"LLMQ_TENANTS": "[{name: heavy, weight: 3}]", **QUEUEING}
    async with Harness(redis, keys, backends={"x": MockSettings(latency_ms=1)}, env=env) as h:
        ids = [await h.submit(tenant="light"), await h.submit(tenant="heavy")]
        await h.wait_terminal(ids)
    # Then each tenant's virtual time moved by its message's estimated tokens over its weight (257 tokens)
    light = float(await redis.get(keys.tenant_vtime("normal", "light")))
    heavy = float(await redis.get(keys.tenant_vtime("normal", "heavy")))
    assert light == 257.0 and abs(heavy - 257 / 3) < 1e-9
    assert 0 < await redis.ttl(keys.tenant_vtime("normal", "light")) <= 600


def test_a_tenant_at_its_max_in_flight_gives_no_more_than_its_room() -> None:
    queue = LevelQueue()
    queue.extend([_cand("capped", i) for i in range(5)] + [_cand("free", 10 + i) for i in range(5)])
    room: dict[str | None, int] = {"capped": 1}
    picks = [c.message.tenant for c in queue.order(6, 0.0, {}, room)]
    assert picks.count("capped") == 1 and picks.count("free") == 5 and room == {"capped": 0}


async def test_max_in_flight_holds_a_tenants_messages_while_others_take_the_slots(
    redis: aioredis.Redis, keys: Keys
) -> None:
    # Given a tenant allowed 1 message in flight and another with no limit, 6 messages each, 4 slots
    env = {"LLMQ_TENANTS": "[{name: capped, max_in_flight: 1}]", "LLMQ_SCHEDULER__STAGGER": "false"}
    backend = {"x": {"max_concurrent": 4}}
    async with Harness(redis, keys, backends={"x": MockSettings(latency_ms=100)}, env=env, backend_config=backend) as h:
        capped = [await h.submit(tenant="capped") for _ in range(6)]
        free = [await h.submit(tenant="free") for _ in range(6)]
        statuses = await h.wait_terminal(capped + free, within=60)
        running_left = await redis.zcard(keys.tenant_running("capped"))
    assert {s["status"] for s in statuses.values()} == {"completed"}

    def most_at_once(ids: list[str]) -> int:
        spans = [(float(statuses[i]["scheduled_at"]), float(statuses[i]["finished_at"])) for i in ids]
        return max(sum(a <= t < b for a, b in spans) for t, _ in spans)

    # Then the capped tenant never had more than one admitted at once, the other used the rest
    assert most_at_once(capped) == 1
    assert most_at_once(free) >= 3
    # and nothing is left counted as running once they all ended
    assert running_left == 0


# --- Who the tenant is --------------------------------------------------------------------------------------


async def test_a_tenants_key_makes_its_requests_the_tenants_and_cannot_claim_another(
    redis: aioredis.Redis, keys: Keys, tmp_path: Path
) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("k-file beta\nk-plain\n")
    env = {"LLMQ_API_KEYS": "k-admin", "LLMQ_TENANTS": TENANTS, "LLMQ_SERVER__API_KEYS_FILE": str(key_file)}
    async with client_for(redis, keys, env) as http:

        async def submit(key: str, **fields: str) -> httpx.Response:
            body = {"request": CHAT, **fields}
            return await http.post("/api/v1/messages", json=body, headers={"Authorization": f"Bearer {key}"})

        # A tenant's key (in the config, in the key file) makes the message the tenant's
        assert (await submit("k-acme")).status_code == 202
        assert (await submit("k-file")).status_code == 202
        assert (await submit("k-acme", tenant="acme")).status_code == 202
        # A key of no tenant names its own (a trusted service's key), or none
        assert (await submit("k-admin", tenant="gamma")).status_code == 202
        assert (await submit("k-plain")).status_code == 202
        # A tenant's key claiming another tenant is refused, naming the field, and nothing is queued
        refused = await submit("k-acme", tenant="beta")
        assert refused.status_code == 403 and refused.json()["field"] == "tenant"
        assert "acme" in refused.json()["error"]
        facade = await http.post(
            "/v1/chat/completions",
            json=CHAT,
            headers={"Authorization": "Bearer k-file", "X-LLMQ-Tenant": "acme"},
        )
        assert facade.status_code == 403 and facade.json()["error"]["param"] == "X-LLMQ-Tenant"
    assert await _tenants_queued(redis, keys) == ["acme", "beta", "acme", "gamma", None]


async def test_without_keys_the_tenant_is_the_one_the_request_names(redis: aioredis.Redis, keys: Keys) -> None:
    async with client_for(redis, keys) as http:
        assert (await http.post("/api/v1/messages", json={"request": CHAT, "tenant": "t1"})).status_code == 202
    assert await _tenants_queued(redis, keys) == ["t1"]


# --- Quotas -------------------------------------------------------------------------------------------------


async def test_max_queued_refuses_a_tenant_past_it_and_frees_a_place_when_one_ends(
    redis: aioredis.Redis, keys: Keys
) -> None:
    async with client_for(redis, keys, {"LLMQ_TENANTS": QUOTAS}) as http:

        async def submit(tenant: str) -> httpx.Response:
            return await http.post("/api/v1/messages", json={"request": CHAT, "tenant": tenant})

        first = [(await submit("slow")).json()["id"] for _ in range(3)]
        # The fourth is refused with 429 naming the quota, with a Retry-After, and is not queued
        refused = await submit("slow")
        assert refused.status_code == 429
        assert "max_queued of 3" in refused.json()["error"] and refused.json()["field"] == "tenant"
        assert int(refused.headers["Retry-After"]) >= 1
        # Another tenant is not held back by it
        assert (await submit("other")).status_code == 202
        # Once one of the three ends (cancelled), there is room for one more
        assert (await http.delete(f"/api/v1/messages/{first[0]}")).status_code == 200
        assert (await submit("slow")).status_code == 202
        assert (await submit("slow")).status_code == 429
    assert (await _tenants_queued(redis, keys)).count("slow") == 4


async def test_rpm_refuses_past_a_minutes_worth_with_when_to_retry(redis: aioredis.Redis, keys: Keys) -> None:
    async with client_for(redis, keys, {"LLMQ_TENANTS": QUOTAS}) as http:
        codes = [
            (await http.post("/api/v1/messages", json={"request": CHAT, "tenant": "paced"})).status_code
            for _ in range(5)
        ]
        refused = await http.post("/api/v1/messages", json={"request": CHAT, "tenant": "paced"})
        # a batch's items are refused one by one, naming the quota
        batch = await http.post("/api/v1/messages/batch", json=[{"request": CHAT, "tenant": "paced"}])
    assert codes == [202] * 5
    assert refused.status_code == 429 and "rpm of 5" in refused.json()["error"]
    # one message every 12 s: the next fits in about 12 s
    assert 10 <= int(refused.headers["Retry-After"]) <= 12
    assert batch.json()[0]["status_code"] == 429 and batch.json()[0]["field"] == "[0].tenant"


async def test_a_request_larger_than_its_tenants_tpm_is_refused_as_bad_input(redis: aioredis.Redis, keys: Keys) -> None:
    # (a 429 would have the client retry for ever: the estimate alone is over a minute's tokens)
    async with client_for(redis, keys, {"LLMQ_TENANT_DEFAULTS__TPM": "1000"}) as http:
        too_big = await http.post("/api/v1/messages", json={"request": {**CHAT, "max_tokens": 5000}})
        fits = await http.post("/api/v1/messages", json={"request": {**CHAT, "max_tokens": 500}})
        refused = await http.post("/api/v1/messages", json={"request": {**CHAT, "max_tokens": 500}})
    assert too_big.status_code == 422 and too_big.json()["field"] == "request.max_tokens"
    assert fits.status_code == 202
    assert refused.status_code == 429 and "tpm of 1000" in refused.json()["error"]


async def test_a_submission_sent_again_after_a_lost_reply_counts_once(redis: aioredis.Redis, keys: Keys) -> None:
    # Given a tenant with every quota, and one submission whose script call is sent twice (its reply lost)
    config = load_config(
        None, env={"LLMQ_KEY_PREFIX": keys.prefix, **QUEUEING, "LLMQ_TENANTS": "[{name: t, max_queued: 5, rpm: 60}]"}
    )
    submitter = Submitter(config, redis=redis, keys=keys)
    msg = new_message(message_id=new_id(), level="normal", request=CHAT, tenant="t")

    call_keys, args = submitter._call([Submission(msg, encode(msg))])
    script = Lua(redis, "submit")
    first, again = await script(call_keys, args), await script(call_keys, args)
    # Then the second call queued nothing and counted nothing more
    assert first[0][0] == b"queued" and again[0][2] == -1
    assert await redis.zcard(keys.tenant_open("t")) == 1
    tat = float(await redis.hget(keys.tenant_rate("t"), "rpm"))
    assert abs(tat - (msg.enqueued_at + 1.0)) < 1e-3  # moved on by one message (60 s / 60), not two


async def _post(http: httpx.AsyncClient, key: str | None = None, **fields: object) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return await http.post("/api/v1/messages", json={"request": CHAT, **fields}, headers=headers)


# --- Found by review: secret leaks --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "env",
    [
        # a natural slip: tenants written as a mapping keyed by name instead of a list
        {"LLMQ_TENANTS": "{acme: {api_keys: [sk-live-TOPSECRET]}}"},
        # a YAML typo in LLMQ_TENANTS (a missing bracket): the whole value is read as a string
        {"LLMQ_TENANTS": "[{name: acme, api_keys: [sk-live-TOPSECRET]}"},
        # the LLMQ_A__B__C form every other setting takes, tried for one tenant's keys
        {"LLMQ_TENANTS__0__API_KEYS": "sk-live-TOPSECRET"},
    ],
)
def test_a_misshapen_tenants_section_never_prints_a_tenants_api_key(env: dict[str, str]) -> None:
    # A correct system names the path and the kind of value only (as it does for api_keys and for a misplaced
    # database.redis secret): "tenants" is a section above tenants[].api_keys, where a key may be.
    # The defect was: rules.holds_secret("tenants") is False: it tests field.startswith(path + ".") only, and the
    # field is "tenants[].api_keys" (a "[" follows, not a ".").
    with pytest.raises(ConfigError) as caught:
        load_config(None, env=env)
    assert "TOPSECRET" not in str(caught.value), str(caught.value)


# --- Found by review: spending another tenant's share or quota ----------------------------------------------


async def test_a_tenants_key_listed_again_in_the_key_file_without_a_tenant_can_claim_any_tenant(
    redis: aioredis.Redis, keys: Keys, tmp_path: Path
) -> None:
    # Given acme's key in the config (tenants[].api_keys), and the same key also in the key file on a line of
    # its own (an operator adding keys to the file as before, or a rotation script re-writing every key)
    key_file = tmp_path / "keys"
    key_file.write_text("k-acme\n")
    env = {"LLMQ_TENANTS": "[{name: acme, api_keys: [k-acme]}]", "LLMQ_SERVER__API_KEYS_FILE": str(key_file)}
    async with client_for(redis, keys, env) as http:
        # When acme's key claims tenant "beta"
        spoofed = await _post(http, "k-acme", tenant="beta")
    # Then a correct system refuses it (403): the key is acme's (or the conflict is refused when the file is
    # read). The defect was: ApiKeyMiddleware (http_api.py) keeps the owner of the LAST matching entry of
    # ring.keys, and KeyRing puts the file's keys after the config's: the file's "no tenant" wins.
    assert spoofed.status_code == 403, spoofed.text


async def test_a_tenant_named_nul_shares_the_unnamed_tenants_quota(redis: aioredis.Redis, keys: Keys) -> None:
    # Given every tenant allowed one open message, and a message of the unnamed tenant queued
    async with client_for(redis, keys, {"LLMQ_TENANT_DEFAULTS__MAX_QUEUED": "1"}) as http:
        assert (await _post(http)).status_code == 202
        # When a request names the tenant "\0" (a distinct tenant, a valid JSON string)
        other = await _post(http, tenant="\u0000")
    # Then a correct system queues it: it is not the unnamed tenant. The defect was: Keys.tenant (keys.py) hashes
    # None as b"\0", the very bytes of the tenant "\0": both share :open, :rate, :running and the vtimes.
    assert other.status_code == 202, other.text


# --- Found by review: counters after a dead-letter replay ---------------------------------------------------


async def test_a_dead_letter_replayed_counts_toward_its_tenants_max_queued(redis: aioredis.Redis, keys: Keys) -> None:
    # Given a tenant allowed one open message, whose one message died (no retries) and was dead-lettered
    env = {"LLMQ_QUEUE__RETRY__MAX_RETRIES": "0", "LLMQ_TENANTS": "[{name: t, max_queued: 1}]"}
    failing = {"a": MockSettings(fail_rate=1.0, fail_status=502, latency_ms=1)}
    async with Harness(redis, keys, backends=failing, env=env) as h:
        mid = await h.submit(tenant="t")
        assert (await h.wait_terminal([mid]))[mid]["status"] == "dead"
    # When an operator replays it (nothing consuming: it waits in its level again, open)
    dlq = DeadLetters(redis=redis, keys=keys, config=load_config(None, env=env))
    [dead] = await dlq.list()
    assert await dlq.replay(dead) is True
    assert (await redis.hget(keys.msg(mid), "status")) == b"queued"
    open_counted = await redis.zcard(keys.tenant_open("t"))
    async with client_for(redis, keys, env) as http:
        second = await _post(http, tenant="t")
    # Then a correct system counts the replayed message as one of the tenant's open ones (it waits again, it
    # will run), so the tenant at its max_queued of 1 is refused a second (429). The defect was:
    # scripts/dlq_replay-5.lua / status.lua's status_replayed make the message live again without ZADDing
    # its hash back to the tenant's open set (the 'open' field is still there; status_closed had ZREMed it).
    assert (open_counted, second.status_code) == (1, 429), second.text


# --- Found by review: admission -----------------------------------------------------------------------------

TWO_LEVELS = (
    "[{name: high, priority: 1, max_wait_time: 5s, max_concurrent: 1},"
    " {name: normal, priority: 2, max_wait_time: 30s, max_concurrent: 8}]"
)


async def _scheduled(h: Harness, mid: str, within: float) -> float | None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        at = (await h.status(mid)).get("scheduled_at")
        if at:
            return float(at)
        await asyncio.sleep(0.02)
    return None


async def test_a_capped_tenants_room_is_not_spent_on_a_level_that_cannot_admit(
    redis: aioredis.Redis, keys: Keys
) -> None:
    # Given tenant t allowed 2 in flight with 1 running (in normal), level high full (1 of 1, another
    # tenant's call), and t waiting with one message in high and one in normal; 7 backend slots free
    env = {
        "LLMQ_QUEUE__LEVELS": TWO_LEVELS,
        "LLMQ_TENANTS": "[{name: t, max_in_flight: 2}]",
        "LLMQ_SCHEDULER__STAGGER": "false",
    }
    slow = {"x": MockSettings(latency_ms=3000)}
    async with Harness(redis, keys, backends=slow, env=env, backend_config={"x": {"max_concurrent": 8}}) as h:
        first = await h.submit("normal", tenant="t")
        assert await _scheduled(h, first, 2.0)
        blocker = await h.submit("high", tenant="other")
        assert await _scheduled(h, blocker, 2.0)
        waiting_high = await h.submit("high", tenant="t")
        submitted = time.time()
        second = await h.submit("normal", tenant="t")
        # When the scheduler runs its rounds
        at = await _scheduled(h, second, 1.5)
        await h.wait_terminal([first, blocker, waiting_high, second], within=30)
    # Then a correct system admits t's normal message at once: t has room for one more and normal has free
    # slots (its high message cannot go anyway: high is at its max_concurrent). Instead every round orders
    # high first, hands t's one unit of room to its high message (LevelQueue.order decrements the shared
    # `room`), select() then admits nothing from high, and normal's order has no message of t: the slots stay
    # idle until the other tenant's high call ends. The defect was: Arbiter._round (arbiter.py, the loop building
    # `ordered` with k = all free slots per level) spends room on candidates that are never admitted.
    late = None if at is None else round(at - submitted, 2)
    assert late is not None and late < 1.0, f"t's normal message admitted after {late}s (None: not within 1.5 s)"


async def test_dead_letters_replayed_after_their_hash_expired_keep_their_tenants_max_in_flight(
    redis: aioredis.Redis, keys: Keys
) -> None:
    # Given a tenant allowed 1 message in flight, whose 3 messages died and whose status hashes have expired
    # (queue.result_retention; dead letters are kept 14 days by default, results 24 h)
    env = {
        "LLMQ_QUEUE__RETRY__MAX_RETRIES": "0",
        "LLMQ_QUEUE__RESULT_RETENTION": "1s",
        "LLMQ_TENANTS": "[{name: capped, max_in_flight: 1}]",
        "LLMQ_SCHEDULER__STAGGER": "false",
    }
    failing = {"x": MockSettings(fail_rate=1.0, fail_status=502, latency_ms=1)}
    async with Harness(redis, keys, backends=failing, env=env) as h:
        ids = [await h.submit(tenant="capped") for _ in range(3)]
        await h.wait_terminal(ids)
    await asyncio.sleep(2.2)
    assert not any([await redis.exists(keys.msg(i)) for i in ids])
    # When an operator replays them all once the backend is healthy again
    dlq = DeadLetters(redis=redis, keys=keys, config=load_config(None, env=env))
    for dead in await dlq.list():
        assert await dlq.replay(dead) is True
    slow = {"x": MockSettings(latency_ms=800)}
    kept = {**env, "LLMQ_QUEUE__RESULT_RETENTION": "60s"}  # (the first to end is read with the last)
    async with Harness(redis, keys, backends=slow, env=kept, backend_config={"x": {"max_concurrent": 8}}) as h:
        statuses = await h.wait_terminal(ids, within=30)
    spans = [(float(s["scheduled_at"]), float(s["finished_at"])) for s in statuses.values()]
    most_at_once = max(sum(a <= t < b for a, b in spans) for t, _ in spans)
    # Then a correct system runs them one at a time (its max_in_flight of 1). Instead all 3 run at once: the
    # remade hash has no 'running' field, so status_scheduled (status.lua) never adds it to the tenant's
    # running set, and admit.lua's cap check counts nothing. The defect was: dlq_replay-5.lua / status_replayed
    # restore neither the tenant's running set nor its open set (DeadLetters.replay passes no tenant keys).
    assert most_at_once == 1, f"{most_at_once} of the capped tenant's messages ran at once"


async def test_a_prompt_of_token_arrays_is_estimated_by_its_tokens(redis: aioredis.Redis, keys: Keys) -> None:
    # Given every tenant allowed 10,000 estimated tokens a minute (tpm), and the 50,000-token prompt that
    # /v1/completions (and /v1/embeddings' input) accept as token ids: flat, or as a batch of token arrays
    env = {"LLMQ_TENANT_DEFAULTS__TPM": "10000", "LLMQ_SERVER__SYNC_TIMEOUT": "100ms"}
    async with client_for(redis, keys, env) as http:
        flat = await http.post("/v1/completions", json={"model": "m", "prompt": [7] * 50_000, "max_tokens": 1})
        nested = await http.post("/v1/completions", json={"model": "m", "prompt": [[7] * 50_000], "max_tokens": 1})
        queued = await redis.xlen(keys.level("normal"))
    # Then a correct system estimates both at 50,001 tokens and refuses both (400 on max_tokens: the
    # estimate alone is over the tpm). The flat one is refused; the nested one is estimated at 2 tokens and
    # queued: a tenant evades its tpm and takes a 25,000-fold share of its level by wrapping its prompt in a
    # list. The defect was: llmq/pipeline/tokens.py prompt_chars counts a list item that is not a string as 4
    # characters (`else 4`), so a token array of any length is 1 token.
    assert flat.status_code == 400
    assert (nested.status_code, queued) == (400, 0), nested.text


def test_a_tenant_capped_in_flight_without_a_bounded_backlog_is_warned_of() -> None:
    # A capped tenant's backlog past the lookahead fills a scheduler's view of its level: the other tenants'
    # messages behind it wait while slots are free (the README says so). The config says so too.
    capped = read_config(
        None, env={"LLMQ_TENANTS": "[{name: a, max_in_flight: 2}, {name: b, max_in_flight: 2, max_queued: 100}]"}
    )
    assert [w.split(":")[0] for w in capped.warnings] == ["tenants[].max_in_flight"]


TPM = {"LLMQ_TENANT_DEFAULTS__TPM": "10000", "LLMQ_SERVER__SYNC_TIMEOUT": "100ms"}
"""Every tenant allowed 10,000 estimated tokens a minute; the facade gives up waiting at once (nothing runs)."""

BIG = "x" * 200_000
"""A prompt of about 50,000 tokens (4 characters a token): five times the tpm above."""


# --- Found by the second review: the key file's conflict error ----------------------------------------------


def test_a_key_file_conflict_never_prints_the_words_of_its_lines(tmp_path: Path) -> None:
    # Given a key file written with its columns swapped (tenant first, then its keys: the natural way to list
    # a tenant with two keys), which the reader takes as the key "acme" given to two tenants
    key_file = tmp_path / "keys"
    key_file.write_text("acme sk-live-SECRET-A\nacme sk-live-SECRET-B\n")
    # When it is read (the ingest's start prints this error and exits 3; a reload logs it)
    with pytest.raises(ValueError) as caught:
        read_key_file(key_file)
    # Then a correct system names the lines only ("line 2: its key has another owner than in line 1"), as the
    # module promises ("the message names the line, never its words"): the second word of a key-file line
    # is as likely a key as a tenant. The defect was: llmq/pipeline/keyfile.py:36-39 quotes both owners
    # (_owner(first[0]), _owner(entry.tenant)) in the ValueError, here the two live keys.
    assert "SECRET" not in str(caught.value), str(caught.value)


# --- Estimates that leave the prompt uncounted (tpm and fair shares evaded) ---------------------------------


@pytest.mark.parametrize(
    ("endpoint", "body"),
    [
        # /v1/completions with an empty `messages` besides its prompt: prompt_chars reads `messages` first and
        # never looks at `prompt` (a completions backend ignores the extra field)
        ("/v1/completions", {"model": "m", "prompt": BIG, "messages": [], "max_tokens": 1}),
        # /v1/embeddings with a `prompt` of null besides its input: request.get("prompt", request.get("input"))
        # takes the null prompt and the input is never counted (an embeddings backend ignores `prompt`)
        ("/v1/embeddings", {"model": "m", "input": BIG, "prompt": None}),
        # /v1/completions has no max_completion_tokens (OpenAI's legacy API, vLLM's CompletionRequest read
        # max_tokens only): the estimate takes it over max_tokens, so a 50,000-token budget counts as 1
        ("/v1/completions", {"model": "m", "prompt": "hi", "max_completion_tokens": 1, "max_tokens": 50_000}),
    ],
    ids=["completions-with-empty-messages", "embeddings-with-null-prompt", "completions-max-completion-tokens"],
)
async def test_a_facade_request_is_estimated_by_what_its_backend_will_count(
    redis: aioredis.Redis, keys: Keys, endpoint: str, body: dict[str, Any]
) -> None:
    async with client_for(redis, keys, TPM) as http:
        answer = await http.post(endpoint, json=body)
        queued = await redis.xlen(keys.level("normal"))
    # Then a correct system estimates about 50,000 tokens and refuses it (400 on max_tokens: the estimate
    # alone is over the tenant's tpm of 10,000), as it does for the same prompt sent plainly. Instead it is
    # estimated at 1 to 256 tokens and queued: the tenant evades its tpm, and takes a share of its level
    # hundreds of times its due. The defect was: llmq/pipeline/tokens.py:16-22 (prompt_chars picks `messages`,
    # else `prompt` even when null, else `input`, whatever the endpoint) and :34 (max_completion_tokens
    # before max_tokens on every endpoint); the estimate is not told which endpoint the body is for.
    assert (answer.status_code, queued) == (400, 0), (answer.status_code, answer.text[:200])


@pytest.mark.parametrize(
    "request_body",
    [
        # n completions of max_tokens each: the backend generates (and bills) n * max_tokens
        {**CHAT, "n": 50, "max_tokens": 5000},
        # function definitions are part of the prompt the model reads (and bills)
        {**CHAT, "max_tokens": 1, "tools": [{"type": "function", "function": {"name": "f", "description": BIG}}]},
        # an assistant turn's tool call arguments are prompt too; its content is null
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": BIG}}],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "ok"},
            ],
            "max_tokens": 1,
        },
    ],
    ids=["n-choices", "tools", "tool-call-arguments"],
)
async def test_a_chat_request_is_estimated_by_all_it_will_cost(
    redis: aioredis.Redis, keys: Keys, request_body: dict[str, Any]
) -> None:
    async with client_for(redis, keys, TPM) as http:
        answer = await http.post("/api/v1/messages", json={"request": request_body})
    # Then a correct system estimates each at about 50,000 tokens or more (250,000 for n=50) and refuses it
    # (422 on the request: its estimate alone is over the tenant's tpm of 10,000). Instead each is estimated
    # at the content of its messages plus one choice's max_tokens, and queued. The defect was:
    # llmq/pipeline/tokens.py:16-18 counts only messages[].content (str() of it), and :34-37 one choice's
    # budget, ignoring `n`, `tools` and `tool_calls`.
    assert answer.status_code == 422, (answer.status_code, answer.text[:200])


# --- The fix for the NUL tenant moved every tenant's counters -----------------------------------------------


async def test_a_tenants_messages_queued_before_the_upgrade_still_count_toward_its_max_queued(
    redis: aioredis.Redis, keys: Keys
) -> None:
    # Given tenant "acme" allowed 2 open messages, with 2 queued by the release before c5ebcbd (a rolling
    # upgrade, ops/README.md "Upgrade and roll back": those messages stay queued across it). That release
    # counted them in the open set named by sha256(name) (and wrote it in each status hash's 'open' field).
    old_open = f"{keys.prefix}:tenant:{hashlib.sha256(b'acme').hexdigest()[:32]}:open"
    now = time.time()
    for _ in range(2):
        hash_key = keys.msg(new_id())
        await redis.hset(hash_key, mapping={"status": "queued", "level": "normal", "open": old_open})
        await redis.zadd(old_open, {hash_key: now + 7 * 86400})
    async with client_for(redis, keys, {"LLMQ_TENANTS": "[{name: acme, max_queued: 2}]"}) as http:
        third = await http.post("/api/v1/messages", json={"request": CHAT, "tenant": "acme"})
    # Then a correct system refuses a third (429 max_queued): the tenant has 2 messages open. Instead it is
    # queued, and a tenant gets its quotas afresh at the upgrade (max_queued and max_in_flight doubled
    # while the old messages drain, rpm/tpm budgets and fair-share virtual times reset; and in a mixed fleet
    # old and new processes count apart). The defect was: llmq/pipeline/keys.py:124 now hashes b"t" + name,
    # renaming every named tenant's keys to fix the unnamed one's; keeping sha256(name) for named tenants
    # and giving the unnamed tenant a key no digest spells (":tenant:-") would have fixed NUL alone.
    assert third.status_code == 429, (third.status_code, third.text[:200])


# --- The lookahead warning checks each tenant alone ---------------------------------------------------------


def test_capped_tenants_whose_backlogs_together_fill_the_lookahead_are_warned_of() -> None:
    from llmq.pipeline.config import read_config

    # Given two tenants capped in flight, each with a max_queued within the lookahead of 2,000 but 3,000
    # together: both at their max_in_flight, their 2,998 waiting messages fill every scheduler's view of the
    # level, and a third tenant's messages behind them wait while slots are free
    loaded = read_config(
        None,
        env={
            "LLMQ_TENANTS": "[{name: a, max_in_flight: 1, max_queued: 1500},"
            " {name: b, max_in_flight: 1, max_queued: 1500}]"
        },
    )
    # Then a correct system warns, as the README advises ("give tenants a max_queued whose sum fits in the
    # lookahead"). The defect was: llmq/pipeline/config/rules.py:97-102 compares each tenant's max_queued with
    # the lookahead alone (and tenant_defaults' too, though it applies to every unlisted tenant at once).
    assert any("lookahead" in w for w in loaded.warnings), loaded.warnings
