"""GET /events in a real browser: Debian's chromium driven by Playwright, a real EventSource.

The page lives on the hub's origin (Playwright answers its one URL; everything else, the ticket
and the stream, is the real hub), so the ticket's cookie and EventSource's own reconnects work
as they would for a page the hub served. Skipped without /usr/bin/chromium, unless
KEEN_REQUIRE_BROWSER=1 (CI sets it, and installs chromium): then the absence is a failure.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.integration.hubkit import running_hub, stream_token
from tests.integration.test_hub_sse import new_session, step

CHROMIUM = "/usr/bin/chromium"

PAGE = """<!doctype html>
<meta charset="utf-8">
<title>keen_stream events</title>
<script>
window.received = [];
window.closes = [];
window.opens = 0;
window.subscribed = 0;
window.errors = 0;
// The token arrives by a call, never in a URL; only the short-lived ticket goes in one.
window.follow = async (token) => {
  const response = await fetch("/events/tickets", {
    method: "POST", headers: {Authorization: "Bearer " + token}});
  if (response.status !== 201) throw new Error("ticket: " + response.status);
  const {ticket} = await response.json();
  const source = new EventSource("/events?ticket=" + encodeURIComponent(ticket));
  source.onopen = () => { window.opens += 1; };
  source.onerror = () => { window.errors += 1; };
  source.onmessage = (e) => {
    window.received.push({id: e.lastEventId, event: JSON.parse(e.data)});
  };
  source.addEventListener("close", (e) => window.closes.push(JSON.parse(e.data)));
  source.addEventListener("subscribed", () => { window.subscribed += 1; });
  window.source = source;
};
</script>
"""


def _browser_or_skip() -> None:
    required = os.environ.get("KEEN_REQUIRE_BROWSER") == "1"
    missing = []
    if not os.path.exists(CHROMIUM):
        missing.append(f"{CHROMIUM} (apt-get install chromium chromium-driver)")
    try:
        import playwright  # noqa: F401
    except ImportError:
        missing.append("playwright (pip install -e '.[dev]')")
    if missing:
        message = "no browser: " + ", ".join(missing)
        if required:
            pytest.fail(message + "; KEEN_REQUIRE_BROWSER=1")
        pytest.skip(message)


@pytest.fixture
async def page() -> AsyncIterator[Any]:
    _browser_or_skip()
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        # Playwright's own browser download does not work here: Debian's chromium. As root
        # (CI) chromium needs --no-sandbox.
        args = ["--no-sandbox"] if os.geteuid() == 0 else []
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=args)
        try:
            yield await browser.new_page()
        finally:
            await browser.close()


async def _received(page: Any, count: int, within: float = 20.0) -> list[dict[str, Any]]:
    await page.wait_for_function(
        f"window.received.length >= {count}", timeout=within * 1000, polling=50
    )
    got: list[dict[str, Any]] = await page.evaluate("window.received")
    return got


async def test_an_eventsource_follows_the_stream_and_resumes_after_a_hub_restart(
    page, db, fresh_dsn, alice, bob
):
    token = await stream_token(db, alice.id)
    async with running_hub(fresh_dsn, hub_sse_retry=0.2) as hub:
        port = int(hub.http.rsplit(":", 1)[1])
        url = f"{hub.http}/sse-test.html"

        async def serve_page(route: Any) -> None:
            await route.fulfill(status=200, content_type="text/html", body=PAGE)

        await page.route(url, serve_page)
        await page.goto(url)
        await page.evaluate("(token) => window.follow(token)", token)
        await page.wait_for_function("window.subscribed >= 1", timeout=10_000)
        await new_session(db, bob, "b")  # never shown to alice
        await new_session(db, alice, "a")
        await step(db, alice, "a")
        first = await _received(page, 2)
    # The hub is gone (its shutdown ended the stream with a close event, 1012): the browser
    # keeps trying. Events written meanwhile must reach it after the restart.
    for _ in range(3):
        await step(db, alice, "a")
        await step(db, bob, "b")
    closes = await page.evaluate("window.closes")
    assert [c["code"] for c in closes] == [1012]
    async with running_hub(fresh_dsn, port=port, hub_sse_retry=0.2) as hub:
        got = await _received(page, 5)
        await step(db, alice, "a")
        got = await _received(page, 6)
        assert await page.evaluate("window.subscribed") >= 2
        assert await page.evaluate("window.opens") >= 2
        # The reconnect authenticated by the ticket's cookie (the ticket itself was spent),
        # which the page's scripts cannot read.
        assert "keen_stream_sse" not in await page.evaluate("document.cookie")
    assert got[:2] == first
    counts = [r["event"]["data"]["iteration_count"] for r in got]
    assert counts == [0, 1, 2, 3, 4, 5]  # nothing lost, nothing twice, in order
    assert got[0]["event"]["event_type"] == "session.created"
    assert [r["id"] for r in got] == [r["event"]["cursor"] for r in got]
    assert {r["event"]["user_id"] for r in got} == {str(alice.id)}
