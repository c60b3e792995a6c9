"""The browser monitor (/monitor) in a real browser against a real hub and real PostgreSQL.

Debian's chromium (/usr/bin/chromium) driven by Playwright; the page is opened from the hub, a
token pasted, and sessions, progress and charges are written through the DAL while the test
reads what the page shows. Skipped when chromium is missing, unless KEEN_REQUIRE_BROWSER=1
(.ci/run sets it and installs chromium).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from keen_stream.dal.database import KeenDatabase
from keen_stream.dal.models import User
from tests.integration.hubkit import Hub, running_hub, stream_token
from tests.integration.test_hub_stream import new_session
from tests.integration.test_stream_client import free_port

CHROMIUM = "/usr/bin/chromium"
#: Where to write a screenshot of the recursive run (tests/tools/monitor_screenshot.py sets it).
SCREENSHOT_ENV = "KEEN_MONITOR_SCREENSHOT"
WAIT_MS = 10_000


@asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    """The machine's chromium; skips the test when it is missing (fails with
    KEEN_REQUIRE_BROWSER=1, as in CI, where a skip would hide that nothing was tested)."""
    if not os.path.exists(CHROMIUM):  # noqa: ASYNC240 (one stat, before any I/O of the test)
        if os.environ.get("KEEN_REQUIRE_BROWSER") == "1":
            pytest.fail(f"KEEN_REQUIRE_BROWSER=1 but {CHROMIUM} is missing (apt-get install)")
        pytest.skip(f"{CHROMIUM} is missing (KEEN_REQUIRE_BROWSER=1 makes this a failure)")
    async with async_playwright() as pw:
        # Playwright's own browser download does not work on these machines: the system one.
        # --no-sandbox: CI runs as root, where chromium's sandbox refuses to start.
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            await browser.close()


class Monitor:
    """One browser tab on /monitor, with what its console said (CSP violations included)."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.console: list[str] = []
        self.states: list[str] = []
        page.on("console", lambda msg: self.console.append(f"{msg.type}: {msg.text}"))
        page.on("pageerror", lambda exc: self.console.append(f"pageerror: {exc}"))

    @classmethod
    async def open(cls, browser: Browser, hub: Hub, token: str) -> Monitor:
        page = await browser.new_page(viewport={"width": 1360, "height": 900})
        monitor = cls(page)
        await page.goto(f"{hub.http}/monitor")
        # Records every state the status pill takes, so a short "reconnecting" is not missed.
        await page.evaluate(
            """() => { window.__states = [];
                new MutationObserver(() => window.__states.push(
                    document.getElementById('status').dataset.state))
                .observe(document.getElementById('status'), {attributes: true}); }"""
        )
        await page.fill("#token", token)
        await page.click("#login button[type=submit]")
        await monitor.expect_state("live")
        return monitor

    async def expect_state(self, state: str) -> None:
        await expect(self.page.locator("#status")).to_have_attribute(
            "data-state", state, timeout=WAIT_MS
        )

    def session(self, handle: str) -> Any:
        return self.page.locator(f'li.session[data-handle="{handle}"]')

    async def cell(self, handle: str, cls: str) -> str:
        text = await self.session(handle).locator(f":scope > .row .{cls}").first.inner_text()
        return " ".join(text.split())

    async def wait_events(self, count: int) -> None:
        await self.page.wait_for_function(
            "n => Number(document.body.dataset.events || 0) >= n", arg=count, timeout=WAIT_MS
        )
        await self.page.wait_for_timeout(100)  # the page renders within 30 ms of an event

    def problems(self) -> list[str]:
        """Errors the page logged, except the browser's own report of a refused connection
        (the hub is down during a restart: expected, and the page itself logs nothing)."""
        return [
            line
            for line in self.console
            if line.startswith(("error", "pageerror")) and "WebSocket connection to" not in line
        ]


def money(value: Decimal | str) -> str:
    """A decimal as the page shows it: exact, trailing zeros trimmed, at least 2 decimals."""
    text = format(Decimal(value).quantize(Decimal("0.000001")), "f").rstrip("0")
    whole, _, frac = text.partition(".")
    return f"{whole}.{frac.ljust(2, '0')}"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def open_then_stop_hub(
    browser: Browser,
    db: KeenDatabase,
    dsn: str,
    user: User,
    write: Callable[[], Awaitable[object]],
) -> tuple[Monitor, int]:
    """A monitor opened on a hub at a fixed port, ``write`` done and shown, then the hub
    stopped (a restarted hub takes the same port, where the page reconnects)."""
    port = free_port()
    async with running_hub(dsn, port=port) as hub:
        monitor = await Monitor.open(browser, hub, await stream_token(db, user.id))
        await write()
        await monitor.wait_events(await events_of(db, user))
    return monitor, port


async def recursive_run(db: KeenDatabase, user: User, prefix: str) -> dict[str, uuid.UUID]:
    """A root with two sub-agents and a grandchild, progress, phases, a budget and charges."""
    await db.billing.purchase(user.id, Decimal("100"), description="test funds")
    tree = [
        (prefix, None),
        (f"{prefix}.explore", prefix),
        (f"{prefix}.build", prefix),
        (f"{prefix}.build.tests", f"{prefix}.build"),
    ]
    ids = {handle: (await new_session(db, user, handle, parent)).id for handle, parent in tree}
    await db.sessions.set_budget(user.id, prefix, Decimal("20"))
    await db.sessions.update_progress(user.id, prefix, phase="SUMMON", iterations=3, tool_calls=5)
    await db.sessions.update_progress(
        user.id, f"{prefix}.explore", phase="PLAN", iterations=4, tokens=12000
    )
    await db.sessions.update_progress(
        user.id, f"{prefix}.build", iterations=2, tool_calls=7, files_created=["a.py", "b.py"]
    )
    await db.sessions.update_progress(
        user.id, f"{prefix}.build.tests", phase="PLAN", iterations=1, tool_calls=2
    )
    await db.credits.deduct_credits(user.id, Decimal("0.25"), f"{prefix}.explore", "model call")
    await db.credits.deduct_credits(user.id, Decimal("0.125"), f"{prefix}.build.tests", "tests")
    await db.sessions.complete_session(
        user.id, f"{prefix}.explore", success=True, claude_cost_usd=Decimal("0.10")
    )
    return ids


async def events_of(db: KeenDatabase, user: User, *, everyone: bool = False) -> int:
    async with db.system_transaction() as conn:
        if everyone:
            return int(await conn.fetchval("SELECT count(*) FROM stream_events"))
        return int(
            await conn.fetchval("SELECT count(*) FROM stream_events WHERE user_id = $1", user.id)
        )


async def test_the_page_and_the_client_are_served_with_a_strict_policy(db, fresh_dsn):
    async with running_hub(fresh_dsn) as hub, httpx.AsyncClient(base_url=hub.http) as http:
        moved = await http.get("/monitor?token=ks_x")
        assert moved.status_code == 308 and moved.headers["location"] == "/monitor/"
        page = await http.get("/monitor/")
        assert page.status_code == 200
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "default-src 'none'" in csp
        assert "frame-ancestors 'none'" in csp
        assert page.headers["referrer-policy"] == "no-referrer"
        assert page.headers["x-content-type-options"] == "nosniff"
        assert '<script type="module" src="monitor.js">' in page.text
        client = await http.get("/monitor/keen-client.js")
        assert client.status_code == 200
        assert client.headers["content-type"] == "text/javascript; charset=utf-8"
        assert "export class KeenClient" in client.text
        for name in ("monitor.js", "monitor.css"):
            assert (await http.get(f"/monitor/{name}")).status_code == 200
        for missing in ("/monitor/app.py", "/monitor/..%2fmonitor.py", "/monitor/x/monitor.js"):
            assert (await http.get(missing)).status_code == 404, missing


async def test_a_recursive_run_shows_live_as_a_tree_and_never_another_users(
    db, fresh_dsn, alice, bob
):
    async with running_hub(fresh_dsn) as hub, chromium() as browser:
        monitor = await Monitor.open(browser, hub, await stream_token(db, alice.id))
        page = monitor.page
        assert await page.evaluate("sessionStorage.getItem('keen.monitor.token')") is not None
        assert "ks_" not in page.url  # the token is never in the address
        await recursive_run(db, bob, "bobs-run")  # another tenant, written first
        ids = await recursive_run(db, alice, "run-1")
        await monitor.wait_events(await events_of(db, alice))

        # The tree: root > explore, build > tests, nested in the page as in the database.
        root = page.locator(f'.tree[data-root-id="{ids["run-1"]}"]')
        nested = root.locator(
            'li[data-handle="run-1"] > ul > li[data-handle="run-1.build"]'
            ' > ul > li[data-handle="run-1.build.tests"]'
        )
        assert await nested.count() == 1
        assert await root.locator('li[data-handle="run-1"] > ul > li').count() == 2
        tests = monitor.session("run-1.build.tests")
        assert await tests.get_attribute("data-parent-id") == str(ids["run-1.build"])

        # Phase, status, counters and cost as the database has them.
        for handle in ids:
            row = await db.sessions.get_session(alice.id, handle)
            assert await monitor.cell(handle, "phase") == row.current_phase
            assert await monitor.cell(handle, "status") == row.execution_status
            assert await monitor.cell(handle, "iterations") == f"{row.iteration_count} iterations"
            assert await monitor.cell(handle, "tools") == f"{row.tool_calls_count} tool calls"
            assert await monitor.cell(handle, "cost") == (
                f"${money(row.claude_cost_usd)} {money(row.keen_cost_credits)} cr"
            )
        assert await monitor.cell("run-1", "phase") == "SUMMON"
        assert await monitor.cell("run-1.explore", "status") == "completed"
        root_row = await db.sessions.get_session(alice.id, "run-1")
        assert root_row.budget_used > 0
        assert await root.locator(".budget-text").inner_text() == (
            f"budget {money(root_row.budget_used)} / 20.00 cr"
        )

        # Credit transactions as they happened, newest first, each once.
        history = await db.credits.get_transaction_history(alice.id)
        rows = page.locator("#credits tbody tr.credit")
        assert await rows.count() == len(history)
        shown = await rows.evaluate_all("rs => rs.map(r => r.dataset.transactionId)")
        assert sorted(shown) == sorted(str(t.id) for t in history)
        newest = await rows.first.locator("td").all_inner_texts()
        assert newest[1] == "usage" and newest[4] in ids

        # Bob's run never reached Alice's page.
        assert await page.locator('[data-handle^="bobs-run"]').count() == 0
        assert await page.locator(f'[data-user-id="{bob.id}"]').count() == 0
        assert await page.locator("#filter-user-label").is_hidden()
        assert monitor.problems() == []

        if target := os.environ.get(SCREENSHOT_ENV):
            await recursive_run(db, alice, "run-2")
            await monitor.wait_events(await events_of(db, alice))
            await page.set_viewport_size({"width": 1360, "height": 640})
            await page.mouse.move(0, 0)
            await page.wait_for_timeout(1300)  # new rows' highlight fades
            await page.screenshot(path=target)


async def test_an_admin_watches_everyone_and_filters_by_user_and_session(
    db, fresh_dsn, alice, bob, admin
):
    async with running_hub(fresh_dsn) as hub, chromium() as browser:
        monitor = await Monitor.open(browser, hub, await stream_token(db, admin.id))
        page = monitor.page
        alice_ids = await recursive_run(db, alice, "alice-run")
        bob_ids = await recursive_run(db, bob, "bob-run")
        await monitor.wait_events(await events_of(db, admin, everyone=True))
        trees = page.locator(".tree")
        assert await trees.count() == 2
        assert await page.locator("#filter-user-label").is_visible()
        assert "admin" in await page.locator("#who").inner_text()

        async def shows_only(root: uuid.UUID, user: User) -> None:
            """One tree, ``root``'s, and only ``user``'s transactions."""
            await page.wait_for_timeout(100)  # the page re-renders within 30 ms
            assert await trees.count() == 1
            assert await trees.first.get_attribute("data-root-id") == str(root)
            visible = page.locator("#credits tbody tr.credit:visible")
            users = await visible.evaluate_all("rs => rs.map(r => r.dataset.userId)")
            assert users and set(users) == {str(user.id)}

        await page.select_option("#filter-user", str(bob.id))
        await shows_only(bob_ids["bob-run"], bob)
        await page.select_option("#filter-user", "")
        await page.fill("#filter-session", "alice-run.build.te")  # a grandchild: its whole tree
        await shows_only(alice_ids["alice-run"], alice)
        assert monitor.problems() == []


async def test_a_hub_restart_shows_reconnecting_then_resumes_with_nothing_lost_or_repeated(
    db, fresh_dsn, alice
):
    async with chromium() as browser:
        monitor, port = await open_then_stop_hub(
            browser, db, fresh_dsn, alice, lambda: recursive_run(db, alice, "run")
        )
        # The hub is gone (it closed with 1012): the page says so and keeps trying.
        await monitor.expect_state("reconnecting")
        banner = monitor.page.locator("#banner")
        assert await banner.get_attribute("data-kind") == "reconnecting"
        await db.sessions.update_progress(alice.id, "run.build", phase="PLAN", iterations=10)
        await db.credits.deduct_credits(alice.id, Decimal("0.5"), "run.build", "while down")
        async with running_hub(fresh_dsn, port=port):
            await monitor.expect_state("live")
            await db.sessions.update_progress(alice.id, "run.build", iterations=100)
            total = await events_of(db, alice)
            await monitor.wait_events(total)
            page = monitor.page
            assert await page.evaluate("Number(document.body.dataset.events)") == total
            assert await page.evaluate("Number(document.body.dataset.reconnects)") >= 1
            assert await banner.is_hidden()
            assert await monitor.cell("run.build", "iterations") == "112 iterations"
            assert await monitor.cell("run.build", "phase") == "PLAN"
            history = await db.credits.get_transaction_history(alice.id)
            shown = await page.locator("#credits tbody tr.credit").evaluate_all(
                "rs => rs.map(r => r.dataset.transactionId)"
            )
            assert sorted(shown) == sorted(str(t.id) for t in history)
            for handle in ("run", "run.explore", "run.build", "run.build.tests"):
                assert await monitor.session(handle).count() == 1
            states = await page.evaluate("window.__states")
            assert "reconnecting" in states and states[-1] == "live"
            assert monitor.problems() == []


async def test_events_that_cannot_be_recovered_show_a_reload_and_stale_rows(db, fresh_dsn, alice):
    async def write() -> None:
        await new_session(db, alice, "old")
        await new_session(db, alice, "kept")

    async with chromium() as browser:
        monitor, port = await open_then_stop_hub(browser, db, fresh_dsn, alice, write)
        await db.sessions.update_progress(alice.id, "old", iterations=5)
        # Past retention while the page was away: what it missed is gone.
        assert await db.events.prune(timedelta(0)) > 0
        async with running_hub(fresh_dsn, port=port):
            await monitor.expect_state("live")
            banner = monitor.page.locator("#banner")
            assert await banner.get_attribute("data-kind") == "reloaded"
            assert "since_expired" in await banner.inner_text()
            assert await monitor.session("old").get_attribute("data-stale") == "true"
            # The next event of a session carries its whole state: its row is current again.
            await db.sessions.update_progress(alice.id, "old", iterations=1)
            await monitor.page.wait_for_selector(
                'li[data-handle="old"][data-stale="false"]', timeout=WAIT_MS
            )
            assert await monitor.cell("old", "iterations") == "6 iterations"
            assert await monitor.session("kept").get_attribute("data-stale") == "true"
            assert await monitor.page.evaluate("document.body.dataset.reloads") == "1"
            assert monitor.problems() == []


async def test_the_origin_is_where_retained_events_start_and_needs_a_stream_token(
    db, fresh_dsn, alice, admin
):
    async with running_hub(fresh_dsn) as hub, httpx.AsyncClient(base_url=hub.http) as http:
        token = await stream_token(db, alice.id)
        assert (await http.get("/monitor/origin", headers=bearer(token))).json() == {"since": "0-0"}
        await new_session(db, alice, "s")
        assert await db.events.prune(timedelta(0)) == 1
        answer = await http.get("/monitor/origin", headers=bearer(token))
        assert answer.status_code == 200 and answer.headers["cache-control"] == "no-store"
        assert answer.json() == {"since": str(await db.events.pruned_through())} != {"since": "0-0"}
        unscoped = await db.tokens.issue(alice.id, "session", scopes=["read"])
        refusals = {
            "": (401, "authentication_required"),
            "ks_ses_nonsense": (401, "invalid_token"),
            unscoped.token.get_secret_value(): (401, "token_scope"),
        }
        for value, (status, code) in refusals.items():
            refused = await http.get("/monitor/origin", headers=bearer(value) if value else {})
            assert (refused.status_code, refused.json()) == (status, {"error": code}), value
            assert refused.headers.get("www-authenticate", "").startswith("Bearer")
        # A token in the query string is no token: refused like none.
        assert (await http.get(f"/monitor/origin?token={token}")).status_code == 401
        await db.users.set_account_status(alice.id, "suspended", actor_id=admin.id)
        inactive = await http.get("/monitor/origin", headers=bearer(token))
        assert (inactive.status_code, inactive.json()) == (403, {"error": "account_inactive"})


async def test_a_page_opened_after_pruning_shows_what_is_retained_without_a_reload(
    db, fresh_dsn, alice
):
    await new_session(db, alice, "pruned")
    parent = await new_session(db, alice, "parent")
    assert await db.events.prune(timedelta(0)) == 2
    await new_session(db, alice, "retained")
    await new_session(db, alice, "child", "parent")
    async with running_hub(fresh_dsn) as hub, chromium() as browser:
        monitor = await Monitor.open(browser, hub, await stream_token(db, alice.id))
        await monitor.wait_events(2)
        assert await monitor.session("retained").count() == 1
        assert await monitor.session("pruned").count() == 0
        # The child's tree is there; its root, with no retained event, as a placeholder.
        placeholder = monitor.page.locator(f'li.placeholder[data-session-id="{parent.id}"]')
        assert await placeholder.locator('li[data-handle="child"]').count() == 1
        assert "no retained event yet" in await placeholder.inner_text()
        assert await monitor.page.locator("#banner").is_hidden()
        assert await monitor.page.evaluate("document.body.dataset.reloads") is None
        assert monitor.problems() == []


async def test_user_text_is_shown_as_text_never_run(db, fresh_dsn, alice):
    payload = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script>'
    async with running_hub(fresh_dsn) as hub, chromium() as browser:
        monitor = await Monitor.open(browser, hub, await stream_token(db, alice.id))
        page = monitor.page
        await db.billing.purchase(alice.id, Decimal("10"), description=payload)
        # Handles are limited to [A-Za-z0-9_.:-] by the database; the rest is free text.
        await new_session(db, alice, "x:1")
        await db.credits.deduct_credits(alice.id, Decimal("0.01"), "x:1", payload)
        await db.sessions.fail_session(alice.id, "x:1", error_message=payload)
        await monitor.wait_events(await events_of(db, alice))
        descriptions = await page.locator("#credits td.description").all_inner_texts()
        assert descriptions == [payload, payload]
        assert await monitor.session("x:1").locator(".error-message").inner_text() == payload
        assert await page.locator("#credits img, #trees img, #trees script").count() == 0
        assert await page.evaluate("window.__xss") is None
        assert monitor.problems() == []
