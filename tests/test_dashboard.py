"""The dashboard page, driven in a real headless Chromium (Debian's `chromium`, through Playwright): it loads
with no console error, its numbers move as messages flow, a request sent from it completes and shows its
reply, a dead letter is replayed from it, and it asks for an API key when keys are configured."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from llmq.cli.stages import postgres_of
from llmq.pipeline.db import make_pool, migrate
from llmq.pipeline.keys import Keys
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
        # When the operator replays it from the page, confirming in the dialog
        await page.wait_for_selector(f"#dlq button[aria-label='replay message {mid}']")
        await page.click(f"#dlq button[aria-label='replay message {mid}']")
        await page.click("#confirm-ok")

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
