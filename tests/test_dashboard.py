"""The dashboard page, driven in a real headless Chromium (Debian's `chromium`, through Playwright): it loads
with no console error, its numbers move as messages flow, a request sent from it completes and shows its
reply, a dead letter is replayed from it, and it asks for an API key when keys are configured."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec
import psycopg
import pytest
import redis.asyncio as aioredis

from llmq.cli.stages import postgres_of
from llmq.pipeline import circuits
from llmq.pipeline.config import PostgresConfig, load_config
from llmq.pipeline.db import make_pool, migrate
from llmq.pipeline.keys import Keys
from llmq.pipeline.models import new_id
from llmq.pipeline.runtime.ops_server import OpsServer
from llmq.stages.ingest import create_app
from llmq.stages.mock_backend import MockSettings
from tests.conftest import eventually
from tests.support.clients import client_for
from tests.support.harness import CHAT, Harness

playwright = pytest.importorskip("playwright.async_api")


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("LLMQ_TEST_REQUIRE_OPS_TOOLS") == "1":
            pytest.fail("chromium is required here (LLMQ_TEST_REQUIRE_OPS_TOOLS=1); .ci/run installs it with apt-get")
        pytest.skip("chromium not installed (apt-get install chromium, as .ci/run does)")
    return path


@contextlib.asynccontextmanager
async def served(h: Harness, redis: aioredis.Redis, keys: Keys) -> AsyncIterator[str]:
    """The ingest API of ``h``'s config on a real port, with its archive pool, as `llmq-stage run ingest`."""
    pool = make_pool(postgres_of(h.config))
    server = OpsServer(create_app(h.config, redis=redis, keys=keys, pool=pool), host="127.0.0.1", port=0, lifespan=True)
    server.start()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        await server.stop()


@contextlib.asynccontextmanager
async def browser_page() -> AsyncIterator[tuple[Any, list[str]]]:
    """A page of a fresh headless Chromium, and the console errors and uncaught exceptions it reports."""
    errors: list[str] = []
    async with playwright.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=_chromium(), args=["--no-sandbox"])
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            yield page, errors
        finally:
            await browser.close()


async def test_the_page_shows_the_queue_moving_and_runs_a_request_sent_from_it(
    redis: aioredis.Redis, keys: Keys, database_url: str
) -> None:
    # Given the whole pipeline with its archive, the API on a real port, and the page open in Chromium
    await migrate(database_url)
    async with (
        Harness(redis, keys, backends={"a": MockSettings(latency_ms=20)}, database_url=database_url) as h,
        served(h, redis, keys) as url,
        browser_page() as (page, errors),
    ):
        await page.goto(url + "/")
        await page.wait_for_selector("#levels tbody tr")
        levels = await page.locator("#levels tbody tr td:first-child").all_inner_texts()
        assert levels == ["realtime", "high", "normal", "low"]
        assert "health: ok" in await page.inner_text("#health")
        assert await page.locator("#key-form").is_hidden()  # no keys configured: nothing to ask for
        assert "a" in await page.inner_text("#backends")
        throughput = page.locator("#levels tbody tr:nth-child(2) td.throughput")
        assert await throughput.inner_text() in ("0.0", "–")
        # When messages flow through the queue
        async with httpx.AsyncClient(base_url=url) as http:
            body = {"level": "high", "request": CHAT}
            ids = [(await http.post("/api/v1/messages", json=body | {"tenant": f"t{i % 2}"})).json()["id"]
                   for i in range(12)]  # fmt: skip

        # Then the page's numbers change without a reload: high's finished messages per minute, the newest
        async def moved() -> bool:
            return (await throughput.inner_text()) not in ("0.0", "–")

        await eventually(moved, within=20, what="the level's throughput on the page")
        await eventually(
            lambda: _contains(page, "#recent", ids[-1][-12:]), within=20, what="the newest message in the list"
        )
        # and each tenant's share of the tokens used: two tenants of equal traffic, about half each
        await eventually(lambda: _contains(page, "#tenants", "t1"), within=20, what="the tenants' shares")
        shares = await page.locator("#tenants td.share").all_inner_texts()
        assert len(shares) == 2 and abs(sum(float(x.rstrip("%")) for x in shares) - 100) < 0.5, shares
        # When a request is sent from the page, with the keyboard alone (Tab from the prompt to Send, Enter)
        await page.select_option("#try-level", "realtime")
        await page.fill("#try-prompt", "Hi from the dashboard")
        await page.focus("#try-prompt")
        await page.keyboard.press("Tab")
        assert await page.evaluate("document.activeElement.textContent") == "Send"
        await page.keyboard.press("Enter")
        # Then it completes and its detail shows the backend's reply
        await page.wait_for_function("document.querySelector('#try-status').textContent.includes('completed')")
        await page.wait_for_selector("#detail dl")
        detail = await page.inner_text("#detail")
        assert "completed" in detail and "mock reply from a" in detail and "realtime" in detail
        # and at a phone's width every section is still there, tables scrolling inside their box
        await page.set_viewport_size({"width": 390, "height": 844})
        assert await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
    assert errors == []


async def _contains(page: Any, selector: str, text: str) -> bool:
    return text in await page.inner_text(selector)


async def test_a_dead_letter_is_replayed_from_the_page_and_completes(
    redis: aioredis.Redis, keys: Keys, database_url: str
) -> None:
    # Given a message dead-lettered by a failing backend (no retries), and the backend healthy again
    await migrate(database_url)
    env = {"LLMQ_QUEUE__RETRY__MAX_RETRIES": "0"}
    failing = {"a": MockSettings(latency_ms=5, fail_rate=1.0, fail_status=502)}
    async with (
        Harness(redis, keys, backends=failing, env=env, database_url=database_url) as h,
        served(h, redis, keys) as url,
        browser_page() as (page, errors),
    ):
        mid = (await h.http.post("/api/v1/messages", json={"request": CHAT})).json()["id"]
        assert (await h.wait_terminal([mid]))[mid]["status"] == "dead"
        async with httpx.AsyncClient() as http:
            admin = f"http://127.0.0.1:{h.servers['a'].port}/admin/config"
            (await http.post(admin, json={"fail_rate": 0.0})).raise_for_status()
        await page.goto(url + "/")
        # When the operator replays it from the page with the keyboard alone: Enter on its Replay button, Tab
        # from Cancel (the dialog's first button, where the focus lands) to Confirm, Enter
        replay = page.locator(f"#dlq button[aria-label^='replay message {mid},']")
        await replay.wait_for()
        await replay.focus()
        # (the list is drawn again every 2 s: the focus stays on that button)
        drawn = await page.inner_text("#updated")
        await page.wait_for_function(f"document.querySelector('#updated').textContent !== {drawn!r}")
        label = await replay.get_attribute("aria-label")
        assert await page.evaluate("document.activeElement.getAttribute('aria-label')") == label
        await page.keyboard.press("Enter")
        await page.wait_for_selector("#confirm[open]")
        assert await page.evaluate("document.activeElement.value") == "cancel"
        await page.keyboard.press("Tab")
        assert await page.evaluate("document.activeElement.id") == "confirm-ok"
        await page.keyboard.press("Enter")

        # Then it runs again and completes, and the dead-letter list no longer holds it
        async def completed() -> bool:
            return (await h.status(mid)).get("status") == "completed"

        await eventually(completed, within=20, what="the replayed message completed")
        await eventually(
            lambda: _not_contains(page, "#dlq", mid[-12:]), within=10, what="the replayed letter gone from the list"
        )
    assert errors == []


async def _not_contains(page: Any, selector: str, text: str) -> bool:
    return text not in await page.inner_text(selector)


async def test_with_api_keys_the_page_asks_for_one_and_then_shows_the_queue(
    redis: aioredis.Redis, keys: Keys, database_url: str
) -> None:
    # Given keys configured: the page and its assets are public, every number behind a key
    await migrate(database_url)
    env = {"LLMQ_API_KEYS": "k-dash"}
    async with (
        Harness(redis, keys, backends={"a": MockSettings()}, env=env, database_url=database_url) as h,
        served(h, redis, keys) as url,
        browser_page() as (page, errors),
    ):
        async with httpx.AsyncClient(base_url=url) as http:
            assert (await http.get("/api/v1/dashboard")).status_code == 401
            assert (await http.get("/ui/app.js")).status_code == 200
            assert (await http.get("/ui/nothing.js")).status_code == 401  # only the page's own files are public
            assert (await http.get("/ui/nothing.js", headers={"X-API-Key": "k-dash"})).status_code == 404
        await page.goto(url + "/")
        await page.wait_for_selector("#key-form:not([hidden])")
        assert "API key needed" in await page.inner_text("#health")
        assert await page.locator("#levels tbody tr").count() == 0
        # When the operator gives the key
        await page.fill("#key", "k-dash")
        await page.click("#key-form button")
        # Then the queue shows
        await page.wait_for_selector("#levels tbody tr")
        assert "health: ok" in await page.inner_text("#health")
    # (the page's own 401s are answers it handles, not errors of its code)
    assert all("401" in e for e in errors), errors


async def test_dead_letters_are_purged_over_http_only_with_an_age(redis: aioredis.Redis, keys: Keys) -> None:
    old = int((time.time() - 3 * 86400) * 1000)
    await redis.xadd(keys.dlq, {"reason": "old"}, id=f"{old}-0")
    await redis.xadd(keys.dlq, {"reason": "new"})
    async with client_for(redis, keys) as http:
        # (an age is required: "everything" is never one request away)
        for bad in ("", "?older_than=0s", "?older_than=soon"):
            refused = await http.delete(f"/api/v1/dlq{bad}")
            assert refused.status_code == 422 and refused.json()["field"] == "older_than"
        purged = await http.delete("/api/v1/dlq?older_than=1d")
    assert purged.json() == {"purged": 1}
    assert [f[b"reason"] for _, f in await redis.xrange(keys.dlq)] == [b"new"]


async def test_a_retried_message_shows_its_failed_attempt_and_request_and_an_open_stream_its_first_token(
    redis: aioredis.Redis, keys: Keys, database_url: str
) -> None:
    # Given a backend that fails every call for now (retried after 2 s), and the page open
    await migrate(database_url)
    env = {"LLMQ_QUEUE__RETRY__INITIAL_BACKOFF": "2s", "LLMQ_QUEUE__RETRY__MAX_BACKOFF": "2s"}
    backend = MockSettings(latency_ms=150, fail_rate=1.0, fail_status=502, tokens_per_s=8, stream_tokens=30)
    async with (
        Harness(redis, keys, backends={"a": backend}, env=env, database_url=database_url) as h,
        served(h, redis, keys) as url,
        browser_page() as (page, errors),
    ):
        await page.goto(url + "/")
        await page.wait_for_selector("#levels tbody tr")
        # When a message fails its first attempt and, the backend healthy again, completes on its second
        mid = await h.submit(request=CHAT | {"messages": [{"role": "user", "content": "detail-probe"}]})

        async def retrying() -> bool:
            return (await h.status(mid)).get("status") == "retrying"

        await eventually(retrying, within=10, what="the first attempt failed")
        async with httpx.AsyncClient() as http:
            admin = f"http://127.0.0.1:{h.servers['a'].port}/admin/config"
            healthy = msgspec.to_builtins(msgspec.structs.replace(backend, fail_rate=0.0))
            (await http.post(admin, json=healthy)).raise_for_status()
        assert (await h.wait_terminal([mid]))[mid]["status"] == "completed"
        await eventually(lambda: _archived(database_url, mid), within=10, what="the message archived")
        # and a streamed message is in its call (30 chunks at 8 a second)
        streamed = await h.submit("high", request=CHAT | {"stream": True})
        # Then the open streams list it with its time to first token (the backend answers after 150 ms)
        row = page.locator(f"#streams tr:has(button[aria-label='show message {streamed}'])")
        await eventually(lambda: _text_is_not(row.locator("td.ttft"), "waiting"), within=15, what="its first token")
        ttft_ms = float((await row.locator("td.ttft").inner_text()).removesuffix(" ms"))
        assert 150 <= ttft_ms < 2000, ttft_ms
        chunks = row.locator("td.chunks")
        before = int(await chunks.inner_text())
        await eventually(lambda: _count_above(chunks, before), within=10, what="its chunks counted as they come")
        # When the operator opens the retried message's detail by its id
        await page.fill("#find-id", mid)
        await page.press("#find-id", "Enter")
        await page.wait_for_selector("#detail ol.attempts li")
        detail = await page.inner_text("#detail")
        # Then it shows the failed attempt (which, on which backend, why), the request and the reply
        attempts = await page.locator("#detail ol.attempts li").all_inner_texts()
        assert len(attempts) == 1 and attempts[0].startswith("attempt 1 on a at ") and "502" in attempts[0], attempts
        assert "detail-probe" in detail and "mock reply from a" in detail and "completed" in detail
        # and the stream, once ended, leaves the list, its time to first token archived
        await h.wait_terminal([streamed], within=30)
        await eventually(
            lambda: _not_contains(page, "#streams", streamed[-12:]), within=10, what="the ended stream gone"
        )
        await eventually(lambda: _archived(database_url, streamed), within=10, what="the stream archived")
        async with await psycopg.AsyncConnection.connect(database_url) as conn:
            cur = await conn.execute("SELECT first_token_ms FROM messages WHERE id = %s", (streamed,))
            row_ttft = (await cur.fetchone() or (None,))[0]
        assert row_ttft is not None and 150 <= row_ttft < 2000
    assert errors == []


async def _archived(database_url: str, message_id: str) -> bool:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute("SELECT 1 FROM messages WHERE id = %s", (message_id,))
        return await cur.fetchone() is not None


async def _text_is_not(locator: Any, text: str) -> bool:
    return await locator.count() == 1 and (await locator.inner_text()) != text


async def _count_above(locator: Any, before: int) -> bool:
    return int(await locator.inner_text()) > before


async def test_the_dashboard_shows_a_circuit_a_dispatcher_opened(
    redis: aioredis.Redis, keys: Keys, database_url: str
) -> None:
    # Given a backend that fails every call, taken out after one failure and not probed for a minute
    env = {"LLMQ_LOADBALANCER__MAX_FAILURES": "1", "LLMQ_LOADBALANCER__HEALTH_CHECK_INTERVAL": "60s"}
    failing = {"a": MockSettings(latency_ms=5, fail_rate=1.0, fail_status=502), "b": MockSettings(latency_ms=5)}
    backends = "[{name: a, url: 'http://x'}, {name: b, url: 'http://y'}]"
    async with client_for(redis, keys, env={"LLMQ_BACKENDS": backends}) as http:

        async def circuit(name: str) -> dict[str, Any]:
            doc = (await http.get("/api/v1/dashboard")).json()
            return next(b["circuit"] for b in doc["backends"] if b["name"] == name)

        async with Harness(redis, keys, backends=failing, env=env) as h:
            # (each dispatcher publishes its circuits as it starts)
            await eventually(lambda: _state(circuit("a"), "closed"), within=10, what="the circuit published")
            # When a message fails on it
            mid = await h.submit()
            # Then the page's document says the circuit is open in the one dispatcher, while the other
            # backend's stays closed (and the message completes there)
            await eventually(lambda: _state(circuit("a"), "open"), within=10, what="the circuit shown open")
            assert (await circuit("a")) | {"until": None} == {
                "state": "open",
                "dispatchers": 1,
                "of": 1,
                "failures": 1,
                "until": None,
            }
            assert (await circuit("b"))["state"] == "closed"
            assert (await h.wait_terminal([mid]))[mid]["status"] == "completed"
        # and once the dispatcher stopped, it holds no view any more
        assert (await circuit("a"))["state"] == "unknown"


async def _state(view: Any, state: str) -> bool:
    return (await view)["state"] == state


async def test_circuit_views_of_dispatchers_long_gone_are_deleted_and_stale_ones_not_read(
    redis: aioredis.Redis, keys: Keys
) -> None:
    now = time.time()
    key = keys.backend_circuits("a")
    old = circuits.View(state="open", failures=9, until=None, at=now - circuits.FORGET_S - 1)
    stale = circuits.View(state="open", failures=9, until=None, at=now - circuits.STALE_S - 1)
    await redis.hset(key, mapping={"gone": msgspec.json.encode(old), "stopped": msgspec.json.encode(stale)})
    await redis.hset(key, "garbled", b"not json")
    live = circuits.View(state="closed", failures=0, until=None, at=now)
    await circuits.publish(redis, keys, "p1", {"a": live})
    assert sorted(await redis.hkeys(key)) == [b"garbled", b"p1", b"stopped"]
    read = await circuits.read(redis, keys, ["a", "never"])
    assert read == {"a": [msgspec.structs.replace(live, at=read["a"][0].at)], "never": []}
    assert circuits.summary(read["a"])["state"] == "closed" and circuits.summary([])["state"] == "unknown"
    # and a cooling circuit whose wait has passed reads as closed (it takes calls), before its next publish
    cooled = circuits.View(state="cooling", failures=0, until=now - 0.1, at=now)
    cooling = circuits.View(state="cooling", failures=0, until=now + 60, at=now)
    await redis.hset(key, mapping={"p2": msgspec.json.encode(cooled), "p3": msgspec.json.encode(cooling)})
    states = sorted(v.state for v in (await circuits.read(redis, keys, ["a"]))["a"])
    assert states == ["closed", "closed", "cooling"]


async def test_a_tenants_key_is_refused_the_dashboard_and_the_dead_letters(redis: aioredis.Redis, keys: Keys) -> None:
    # Given an operator's key and a tenant's key
    env = {"LLMQ_API_KEYS": "k-ops", "LLMQ_TENANTS": "[{name: acme, api_keys: [k-acme]}]"}
    async with client_for(redis, keys, env=env) as http:
        for path, method in [
            ("/api/v1/dashboard", "GET"),
            ("/api/v1/dashboard/messages/0190b3a0-0000-7000-8000-000000000000", "GET"),
            ("/api/v1/dlq", "GET"),
            ("/api/v1/dlq/1-0", "GET"),
            ("/api/v1/dlq/1-0/replay", "POST"),
            ("/api/v1/dlq?older_than=1d", "DELETE"),
        ]:
            # Then every tenant's messages are the operator's to see: the tenant's key gets 403
            tenant = await http.request(method, path, headers={"X-API-Key": "k-acme"})
            assert tenant.status_code == 403 and "operator" in tenant.json()["error"], (path, tenant.text)
            operator = await http.request(method, path, headers={"X-API-Key": "k-ops"})
            assert operator.status_code in (200, 404), (path, operator.text)
        # and the tenant's key still submits
        sent = await http.post("/api/v1/messages", json={"request": CHAT}, headers={"X-API-Key": "k-acme"})
        assert sent.status_code == 202


_ROW = (
    "INSERT INTO messages (id, level, status, tenant, backend, attempts, enqueued_at, started_at, finished_at,"
    " queue_wait_ms, latency_ms, prompt_tokens, completion_tokens, error)"
    " VALUES (%s, 'normal', %s, %s, %s, 1, now() - interval '2 s', now() - interval '1 s', now(), 1000, 1000,"
    " %s, 0, %s)"
)


async def test_shares_count_every_tenant_and_a_backends_error_rate_only_its_faults(
    redis: aioredis.Redis, keys: Keys, database_url: str
) -> None:
    # Given 60 tenants of 100 tokens each (more than the list shows), and backend a's ten messages: 6 answered,
    # one cancelled by its client, one refused by a 400 (the request's fault), one dead, one failed on a 502
    await migrate(database_url)
    outcomes = [("completed", None)] * 6 + [("cancelled", "the streaming client went away")]
    outcomes += [("failed", "backend a answered 400: bad request"), ("dead", "failed 4 attempts")]
    outcomes += [("failed", "backend a answered 502 with a body that cannot be read: ValueError")]
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        for i in range(60):
            await conn.execute(_ROW, (new_uuid(), "completed", f"t{i:02d}", "b", 100, None))
        for status, error in outcomes:
            await conn.execute(_ROW, (new_uuid(), status, "x", "a", 0, error))
        await conn.commit()
    pool = make_pool(PostgresConfig(dsn=database_url))
    env = {"LLMQ_BACKENDS": "[{name: a, url: 'http://x'}, {name: b, url: 'http://y'}]"}
    async with client_for(redis, keys, env=env, pool=pool) as http:
        doc = (await http.get("/api/v1/dashboard")).json()
    await pool.close()
    # Then the shares are of every tenant's tokens (the page divides by tokens_total), and a's error rate
    # counts the dead message and the 502 only
    archive = doc["archive"]
    assert len(archive["tenants"]) == 50 and archive["tokens_total"] == 6000
    assert archive["backends"]["a"]["error_rate"] == 0.2


def new_uuid() -> uuid.UUID:
    return uuid.UUID(new_id())


async def test_focus_stays_on_the_dead_letter_a_keyboard_user_is_on(redis: aioredis.Redis, keys: Keys) -> None:
    # Given two dead letters with no readable message (their Replay buttons used to share one label) and a
    # third arriving while the page is open
    for n in (1, 2):
        await redis.xadd(keys.dlq, {"d": b"\xff garbage", "reason": f"poison {n}", "stream": "x"})
    async with (
        served_app(redis, keys) as url,
        browser_page() as (page, errors),
    ):
        await page.goto(url + "/")
        await page.wait_for_selector("#dlq tbody tr:nth-child(2) button")
        await page.evaluate("window.focusins = 0; document.addEventListener('focusin', () => window.focusins++)")
        # When the keyboard user is on the second letter's Replay button through refreshes, one of which
        # brings a new letter
        await page.focus("#dlq tbody tr:nth-child(2) button")
        for _ in range(2):
            drawn = await page.inner_text("#updated")
            await page.wait_for_function(f"document.querySelector('#updated').textContent !== {drawn!r}")
        await redis.xadd(keys.dlq, {"d": b"\xff garbage", "reason": "poison 3", "stream": "x"})
        await page.wait_for_selector("#dlq tbody tr:nth-child(3)")
        # Then the focus is on that letter's button still, and refreshes that changed nothing moved no focus
        reason = await page.evaluate("document.activeElement.closest('tr').children[2].textContent")
        assert reason == "poison 2"
        assert await page.evaluate("window.focusins") <= 2  # the focus itself, and its return after the new row
    assert errors == []


@contextlib.asynccontextmanager
async def served_app(redis: aioredis.Redis, keys: Keys) -> AsyncIterator[str]:
    config = load_config(None, env={"LLMQ_KEY_PREFIX": keys.prefix})
    server = OpsServer(create_app(config, redis=redis, keys=keys), host="127.0.0.1", port=0, lifespan=True)
    server.start()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        await server.stop()


async def test_the_page_shows_a_batchs_progress_as_it_runs(
    redis: aioredis.Redis, keys: Keys, database_url: str
) -> None:
    # Given the whole pipeline with the batch stage, a backend doing 2 calls at once, and the page open
    await migrate(database_url)
    stages = ("schedule", "dispatch", "retry", "batch")
    config = {"a": {"max_concurrent": 2}}
    async with (
        Harness(
            redis, keys, backends={"a": MockSettings(latency_ms=50)}, database_url=database_url, stages=stages,
            backend_config=config,
        ) as h,
        served(h, redis, keys) as url,
        browser_page() as (page, errors),
    ):  # fmt: skip
        await page.goto(url + "/")
        await page.wait_for_selector("#levels tbody tr")
        # When a batch of 60 lines is uploaded and created
        lines = [
            msgspec.json.encode({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": CHAT})
            for i in range(60)
        ]
        async with httpx.AsyncClient(base_url=url) as http:
            files = {"file": ("in.jsonl", b"\n".join(lines))}
            fid = (await http.post("/v1/files", data={"purpose": "batch"}, files=files)).json()["id"]
            body = {"input_file_id": fid, "endpoint": "/v1/chat/completions", "completion_window": "1h"}
            bid = (await http.post("/v1/batches", json=body)).json()["id"]
        # Then the page lists it in progress, its completed count moving, and then completed
        row = page.locator(f"#batches tr:has-text('{bid}')")
        await eventually(lambda: _text_is(row.locator("td.status"), "in_progress"), within=15, what="in progress")
        completed = row.locator("td.completed")
        first = int(await completed.inner_text())
        await eventually(lambda: _count_above(completed, first), within=15, what="its completed count moving")
        await eventually(lambda: _text_is(row.locator("td.status"), "completed"), within=30, what="completed")
        assert await row.locator("td.completed").inner_text() == "60"
        assert await row.locator("progress").evaluate("p => p.value === p.max")
    assert errors == []


async def _text_is(locator: Any, text: str) -> bool:
    return await locator.count() == 1 and (await locator.inner_text()) == text
