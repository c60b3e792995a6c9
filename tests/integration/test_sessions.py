"""Agent sessions: creation, hierarchy, progress, lists, trees, roll-ups, the sweep, isolation.

Completion and its charge live in test_sessions_completion.py; query plans in
test_sessions_plans.py.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import pytest

from keen_stream.dal.database import KeenDatabase
from keen_stream.dal.models import SessionCreate, User
from keen_stream.errors import (
    InvalidIdentifier,
    InvalidInput,
    NotFound,
    SessionAlreadyEnded,
    SessionDepthExceeded,
    SessionExists,
)
from tests.conftest import make_settings


def new(session_id: str, parent: str | None = None, **extra: object) -> SessionCreate:
    return SessionCreate(
        session_handle=session_id,
        vision=f"vision of {session_id}",
        working_directory="/tmp/work",
        git_branch="main",
        parent_session_handle=parent,
        **extra,  # type: ignore[arg-type]
    )


async def count_sessions(owner_conn: asyncpg.Connection) -> int:
    count: int = await owner_conn.fetchval("SELECT count(*) FROM agent_sessions")
    return count


async def row(owner_conn: asyncpg.Connection, handle: str) -> asyncpg.Record:
    return await owner_conn.fetchrow("SELECT * FROM agent_sessions WHERE session_id = $1", handle)


# --- creation and hierarchy -------------------------------------------------------------------
async def test_root_session_is_its_own_root_and_starts_in_explore(
    db: KeenDatabase, alice: User
) -> None:
    s = await db.sessions.create_session(alice.id, new("root-1"))
    assert s.user_id == alice.id
    assert s.root_session_id == s.id
    assert s.parent_session_id is None
    assert s.session_depth == 0
    assert s.current_phase == "EXPLORE"
    assert s.execution_status == "running"
    assert s.success is None and s.end_time is None
    assert (s.is_admin_session, s.bypass_credit_deduction) == (False, False)
    assert s.claude_cost_usd == Decimal(0)


async def test_children_get_depth_and_root_from_the_database(db: KeenDatabase, alice: User) -> None:
    root = await db.sessions.create_session(alice.id, new("r"))
    child = await db.sessions.create_session(alice.id, new("r.1", "r"))
    grandchild = await db.sessions.create_session(alice.id, new("r.1.1", "r.1"))
    assert (child.session_depth, grandchild.session_depth) == (1, 2)
    assert child.parent_session_id == root.id
    assert grandchild.parent_session_id == child.id
    assert child.root_session_id == grandchild.root_session_id == root.id


async def test_admin_flags_come_from_the_database_not_the_caller(
    db: KeenDatabase, admin: User, alice: User, owner_conn: asyncpg.Connection
) -> None:
    with pytest.raises(InvalidInput):
        await db.sessions.create_session(
            alice.id,
            session_handle="x",
            vision="v",
            working_directory="/w",
            git_branch="main",
            is_admin_session=True,  # type: ignore[call-arg]  # not a parameter: the point
        )
    # keen_app cannot write the flags even with raw SQL: the columns are not granted.
    with pytest.raises(Exception, match="permission denied"):
        async with db.user_transaction(alice.id) as conn:
            await conn.execute(
                "INSERT INTO agent_sessions (user_id, session_id, git_branch, vision,"
                " working_directory, is_admin_session) VALUES ($1, 'raw', 'm', 'v', '/w', true)",
                alice.id,
            )
    admin_session = await db.sessions.create_session(admin.id, new("adm"))
    assert (admin_session.is_admin_session, admin_session.bypass_credit_deduction) == (True, True)
    # An unlimited (non-admin) account bypasses deduction but is not an admin session.
    await owner_conn.execute(
        "UPDATE credit_accounts SET unlimited_credits = true WHERE user_id = $1", alice.id
    )
    s = await db.sessions.create_session(alice.id, new("unl"))
    assert (s.is_admin_session, s.bypass_credit_deduction) == (False, True)


async def test_another_tenants_parent_is_not_found_and_nothing_is_written(
    db: KeenDatabase, alice: User, bob: User, owner_conn: asyncpg.Connection
) -> None:
    await db.sessions.create_session(bob.id, new("bobs-root"))
    before = await count_sessions(owner_conn)
    with pytest.raises(NotFound):
        await db.sessions.create_session(alice.id, new("alice-child", "bobs-root"))
    with pytest.raises(NotFound):
        await db.sessions.create_session(alice.id, new("alice-child", "no-such-parent"))
    assert await count_sessions(owner_conn) == before
    # Even raw SQL as keen_app cannot hang a session under bob's tree (the insert trigger).
    bobs = await row(owner_conn, "bobs-root")
    with pytest.raises(NotFound):
        async with db.user_transaction(alice.id) as conn:
            await conn.execute(
                "INSERT INTO agent_sessions (user_id, session_id, parent_session_id, git_branch,"
                " vision, working_directory) VALUES ($1, 'sneaky', $2, 'm', 'v', '/w')",
                alice.id,
                bobs["id"],
            )
    assert await count_sessions(owner_conn) == before


async def test_reused_session_id_is_a_conflict(
    db: KeenDatabase, alice: User, bob: User, owner_conn: asyncpg.Connection
) -> None:
    await db.sessions.create_session(alice.id, new("dup"))
    with pytest.raises(SessionExists) as err:
        await db.sessions.create_session(alice.id, new("dup"))
    assert err.value.session_handle == "dup"
    # Handles are global (the seed's UNIQUE): another user cannot take it either.
    with pytest.raises(SessionExists):
        await db.sessions.create_session(bob.id, new("dup"))
    assert await count_sessions(owner_conn) == 1


async def test_depth_limit_is_configurable(
    fresh_dsn: str, alice: User, owner_conn: asyncpg.Connection
) -> None:
    async with await KeenDatabase.connect(
        settings=make_settings(fresh_dsn, max_session_depth=2), migrate=False
    ) as db:
        await db.sessions.create_session(alice.id, new("d0"))
        await db.sessions.create_session(alice.id, new("d1", "d0"))
        await db.sessions.create_session(alice.id, new("d2", "d1"))
        with pytest.raises(SessionDepthExceeded) as err:
            await db.sessions.create_session(alice.id, new("d3", "d2"))
        assert err.value.details == {"depth": 3, "max_depth": 2}
    assert await count_sessions(owner_conn) == 3


async def test_no_children_under_an_ended_parent(db: KeenDatabase, alice: User) -> None:
    await db.sessions.create_session(alice.id, new("p"))
    await db.sessions.cancel_session(alice.id, "p")
    with pytest.raises(SessionAlreadyEnded):
        await db.sessions.create_session(alice.id, new("p.1", "p"))


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"session_handle": "has space"}, InvalidInput),
        ({"session_handle": "x" * 65}, InvalidInput),
        ({"session_handle": ""}, InvalidInput),
        ({"session_handle": "semi;colon"}, InvalidInput),
        ({"parent_session_handle": "bad parent"}, InvalidInput),
        ({"vision": ""}, InvalidInput),
        ({"vision": "v" * 100_001}, InvalidInput),
        ({"vision": "nul\x00byte"}, InvalidInput),
        ({"working_directory": "/" * 4097}, InvalidInput),
        ({"git_branch": "b" * 256}, InvalidInput),
        ({"streaming_enabled": "yes"}, InvalidInput),
        ({"vision": 42}, InvalidInput),
    ],
)
async def test_bad_create_input_is_refused_and_writes_nothing(
    db: KeenDatabase,
    alice: User,
    owner_conn: asyncpg.Connection,
    fields: dict[str, Any],
    error: type[InvalidInput],
) -> None:
    values: dict[str, Any] = {
        "session_handle": "ok",
        "vision": "v",
        "working_directory": "/w",
        "git_branch": "main",
    }
    values.update(fields)
    with pytest.raises(error) as refused:
        await db.sessions.create_session(alice.id, **values)
    # refused for the field under test, and for nothing else
    assert [p["field"] for p in refused.value.details["errors"]] == list(fields)
    assert await count_sessions(owner_conn) == 0


async def test_bad_user_id_is_an_invalid_identifier(db: KeenDatabase) -> None:
    with pytest.raises(InvalidIdentifier):
        await db.sessions.create_session("not-a-uuid", new("x"))
    with pytest.raises(InvalidIdentifier):
        await db.sessions.get_session("not-a-uuid", "x")


# --- progress ---------------------------------------------------------------------------------
async def test_progress_increments_appends_once_and_bumps_activity(
    db: KeenDatabase, alice: User
) -> None:
    s = await db.sessions.create_session(alice.id, new("prog"))
    a = await db.sessions.update_progress(
        alice.id,
        "prog",
        iterations=1,
        tool_calls=3,
        tokens=1000,
        context_tokens=400,
        files_created=["a.py", "b.py", "a.py"],
        files_modified=["README.md"],
    )
    b = await db.sessions.update_progress(
        alice.id,
        "prog",
        phase="PLAN",
        iterations=2,
        tokens=500,
        files_created=["b.py", "c.py"],
        files_deleted=["old.py"],
    )
    assert (b.iteration_count, b.tool_calls_count, b.tokens_used, b.context_tokens_used) == (
        3,
        3,
        1500,
        400,
    )
    assert b.files_created == ["a.py", "b.py", "c.py"]
    assert b.files_modified == ["README.md"]
    assert b.files_deleted == ["old.py"]
    assert b.current_phase == "PLAN"
    assert s.last_activity_at <= a.last_activity_at <= b.last_activity_at


async def test_concurrent_progress_updates_lose_no_increment(
    db: KeenDatabase, alice: User, owner_conn: asyncpg.Connection
) -> None:
    await db.sessions.create_session(alice.id, new("hot"))
    workers, rounds = 8, 10

    async def worker(n: int) -> None:
        for i in range(rounds):
            await db.sessions.update_progress(
                alice.id,
                "hot",
                iterations=1,
                tool_calls=2,
                tokens=7,
                files_modified=[f"w{n}.py", "shared.py"],
                files_created=[f"w{n}-{i}.txt"],
            )

    await asyncio.gather(*(worker(n) for n in range(workers)))
    r = await row(owner_conn, "hot")
    total = workers * rounds
    assert (r["iteration_count"], r["tool_calls_count"], r["tokens_used"]) == (
        total,
        2 * total,
        7 * total,
    )
    assert sorted(r["files_modified"]) == sorted(
        [f"w{n}.py" for n in range(workers)] + ["shared.py"]
    )
    assert len(r["files_created"]) == total


@pytest.mark.parametrize(
    "kwargs",
    [
        {"iterations": -1},
        {"tool_calls": -5},
        {"tokens": -1},
        {"context_tokens": -1},
        {"iterations": 1.5},
        {"iterations": True},
        {"iterations": 2**31},
        {"tokens": 2**63},
        {"phase": "DEPLOY"},
        {"phase": "explore"},
        {"files_created": "a.py"},
        {"files_created": [""]},
        {"files_created": ["x" * 4097]},
        {"files_created": ["a\x00b"]},
        {"files_created": [1]},
        {"files_modified": [f"f{i}" for i in range(1001)]},
    ],
)
async def test_bad_progress_is_refused_and_changes_nothing(
    db: KeenDatabase, alice: User, owner_conn: asyncpg.Connection, kwargs: dict[str, Any]
) -> None:
    await db.sessions.create_session(alice.id, new("p"))
    await db.sessions.update_progress(alice.id, "p", iterations=1, files_created=["keep.py"])
    before = dict(await row(owner_conn, "p"))
    with pytest.raises(InvalidInput):
        await db.sessions.update_progress(alice.id, "p", **kwargs)
    assert dict(await row(owner_conn, "p")) == before


async def test_counter_overflow_is_invalid_input(
    db: KeenDatabase, alice: User, owner_conn: asyncpg.Connection
) -> None:
    await db.sessions.create_session(alice.id, new("big"))
    await db.sessions.update_progress(alice.id, "big", iterations=2**31 - 1)
    with pytest.raises(InvalidInput):
        await db.sessions.update_progress(alice.id, "big", iterations=1)
    assert (await row(owner_conn, "big"))["iteration_count"] == 2**31 - 1


async def test_progress_on_an_ended_session_is_refused(
    db: KeenDatabase, alice: User, owner_conn: asyncpg.Connection
) -> None:
    await db.sessions.create_session(alice.id, new("done"))
    await db.sessions.cancel_session(alice.id, "done", reason="user stopped it")
    before = dict(await row(owner_conn, "done"))
    with pytest.raises(SessionAlreadyEnded):
        await db.sessions.update_progress(alice.id, "done", iterations=1)
    assert dict(await row(owner_conn, "done")) == before


async def test_keen_app_cannot_rewrite_counters_or_costs_directly(
    db: KeenDatabase, alice: User, owner_conn: asyncpg.Connection
) -> None:
    await db.sessions.create_session(alice.id, new("g"))
    await db.sessions.update_progress(alice.id, "g", iterations=5)
    before = dict(await row(owner_conn, "g"))
    statements = [
        ("UPDATE agent_sessions SET iteration_count = 0 WHERE session_id = 'g'", InvalidInput),
        ("UPDATE agent_sessions SET claude_cost_usd = 1 WHERE session_id = 'g'", InvalidInput),
        ("UPDATE agent_sessions SET budget_used = 0 WHERE session_id = 'g'", Exception),
        (
            "UPDATE agent_sessions SET bypass_credit_deduction = true WHERE session_id = 'g'",
            Exception,
        ),
        ("UPDATE agent_sessions SET user_id = gen_random_uuid() WHERE session_id = 'g'", Exception),
        ("DELETE FROM agent_sessions WHERE session_id = 'g'", Exception),
    ]
    for sql, error in statements:
        with pytest.raises(error):
            async with db.user_transaction(alice.id) as conn:
                await conn.execute(sql)
    assert dict(await row(owner_conn, "g")) == before


# --- isolation --------------------------------------------------------------------------------
async def test_users_see_their_own_sessions_and_admins_see_all(
    db: KeenDatabase, alice: User, bob: User, admin: User
) -> None:
    # The seed's "enforces user isolation at database level", ported.
    a = await db.sessions.create_session(alice.id, new("alice-s"))
    b = await db.sessions.create_session(bob.id, new("bob-s"))
    mine = await db.sessions.get_user_sessions(alice.id)
    assert [s.id for s in mine] == [a.id]
    assert [s.id for s in await db.sessions.get_user_sessions(bob.id)] == [b.id]
    everyone = await db.sessions.get_user_sessions(admin.id)
    assert {a.id, b.id} <= {s.id for s in everyone}
    assert (await db.sessions.get_session(admin.id, "bob-s")).id == b.id
    with pytest.raises(NotFound):
        await db.sessions.get_session(alice.id, "bob-s")
    with pytest.raises(NotFound):
        await db.sessions.get_session_tree(alice.id, "bob-s")
    with pytest.raises(NotFound):
        await db.sessions.get_tree_rollup(alice.id, "bob-s")
    with pytest.raises(NotFound):
        await db.sessions.get_user_sessions(alice.id, before="bob-s")


async def test_a_user_cannot_change_another_users_session(
    db: KeenDatabase, alice: User, bob: User, admin: User, owner_conn: asyncpg.Connection
) -> None:
    await db.sessions.create_session(bob.id, new("bobs"))
    await db.sessions.update_progress(bob.id, "bobs", iterations=2)
    before = dict(await row(owner_conn, "bobs"))
    attempts = [
        lambda: db.sessions.update_progress(alice.id, "bobs", iterations=1),
        lambda: db.sessions.complete_session(
            alice.id, "bobs", success=True, claude_cost_usd=Decimal(1)
        ),
        lambda: db.sessions.fail_session(alice.id, "bobs", error_message="x"),
        lambda: db.sessions.cancel_session(alice.id, "bobs"),
        lambda: db.sessions.set_budget(alice.id, "bobs", Decimal(10)),
        # Writes are owner-only even for an admin; admins read through RLS.
        lambda: db.sessions.update_progress(admin.id, "bobs", iterations=1),
    ]
    for attempt in attempts:
        with pytest.raises(NotFound):
            await attempt()
    # Raw SQL as keen_app: RLS makes bob's row invisible, so 0 rows change.
    async with db.user_transaction(alice.id) as conn:
        status = await conn.execute(
            "UPDATE agent_sessions SET current_phase = 'PLAN' WHERE session_id = 'bobs'"
        )
    assert status == "UPDATE 0"
    assert dict(await row(owner_conn, "bobs")) == before


# --- lists ------------------------------------------------------------------------------------
async def test_keyset_pages_cover_every_session_once_newest_first(
    db: KeenDatabase, alice: User, bob: User, owner_conn: asyncpg.Connection
) -> None:
    for i in range(7):
        await db.sessions.create_session(alice.id, new(f"a{i}"))
    await db.sessions.create_session(bob.id, new("b0"))
    # Two sessions with the same start time: the id breaks the tie.
    await owner_conn.execute(
        "UPDATE agent_sessions SET start_time = (SELECT start_time FROM agent_sessions"
        " WHERE session_id = 'a3') WHERE session_id = 'a4'"
    )
    seen: list[str] = []
    before = None
    while True:
        page = await db.sessions.get_user_sessions(alice.id, limit=3, before=before)
        if not page:
            break
        seen += [s.session_handle for s in page]
        before = page[-1].session_handle
    assert sorted(seen) == [f"a{i}" for i in range(7)]
    assert len(seen) == len(set(seen))
    everything = await db.sessions.get_user_sessions(alice.id, limit=50)
    keys = [(s.start_time, s.id) for s in everything]
    assert keys == sorted(keys, reverse=True)
    assert [s.session_handle for s in everything] == seen


async def test_list_filters_by_status(db: KeenDatabase, alice: User) -> None:
    for name in ("s1", "s2", "s3"):
        await db.sessions.create_session(alice.id, new(name))
    await db.sessions.cancel_session(alice.id, "s2")
    running = await db.sessions.get_user_sessions(alice.id, status="running")
    assert sorted(s.session_handle for s in running) == ["s1", "s3"]
    cancelled = await db.sessions.get_user_sessions(alice.id, status="cancelled")
    assert [s.session_handle for s in cancelled] == ["s2"]
    for bad in (
        {"status": "done"},
        {"limit": 0},
        {"limit": 501},
        {"limit": "5"},
        {"before": "not a handle"},
    ):
        with pytest.raises(InvalidInput):
            await db.sessions.get_user_sessions(alice.id, **bad)


# --- trees and roll-ups -----------------------------------------------------------------------
async def build_tree(
    db: KeenDatabase, owner: User, owner_conn: asyncpg.Connection
) -> dict[str, tuple[str, str, int, int]]:
    """root -> {a -> {a1 -> {a1x}, a2}, b}: four levels, seven sessions, set costs."""
    shape = [("root", None), ("a", "root"), ("b", "root"), ("a1", "a"), ("a2", "a"), ("a1x", "a1")]
    for handle, parent in shape:
        await db.sessions.create_session(owner.id, new(handle, parent))
    await db.sessions.create_session(owner.id, new("unrelated"))
    costs = {
        "root": ("0.100001", "0.500005", 100, 10),
        "a": ("1.000001", "5.000005", 2000, 200),
        "b": ("0.333333", "1.666665", 30, 3),
        "a1": ("2.5", "12.5", 4000, 400),
        "a2": ("0.000001", "0.000005", 1, 0),
        "a1x": ("10.000007", "50.000035", 50000, 5000),
        "unrelated": ("99", "495", 1, 1),
    }
    for handle, (usd, credits, tokens, ctx) in costs.items():
        await db.sessions.update_progress(
            owner.id, handle, tokens=tokens, context_tokens=ctx, iterations=1, tool_calls=2
        )
        # Costs are only written when a session ends; arrange them directly for the roll-up.
        await owner_conn.execute(
            "UPDATE agent_sessions SET claude_cost_usd = $2, keen_cost_credits = $3"
            " WHERE session_id = $1",
            handle,
            Decimal(usd),
            Decimal(credits),
        )
    return costs


async def test_tree_nests_four_levels_and_rolls_up_exactly(
    db: KeenDatabase, alice: User, owner_conn: asyncpg.Connection
) -> None:
    costs = await build_tree(db, alice, owner_conn)
    tree = await db.sessions.get_session_tree(alice.id, "root")
    assert tree.root.session.session_handle == "root"
    assert [c.session.session_handle for c in tree.root.children] == ["a", "b"]
    a = tree.root.children[0]
    assert [c.session.session_handle for c in a.children] == ["a1", "a2"]
    assert [c.session.session_handle for c in a.children[0].children] == ["a1x"]
    assert [s.session_handle for s in tree.walk()] == ["root", "a", "a1", "a1x", "a2", "b"]

    in_tree = [h for h in costs if h != "unrelated"]
    r = await db.sessions.get_tree_rollup(alice.id, "root")
    assert r.sessions == 6 and r.running == 6
    assert (r.max_depth, r.height) == (3, 3)
    assert r.claude_cost_usd == Decimal("13.933343")
    assert r.claude_cost_usd == sum(Decimal(costs[h][0]) for h in in_tree)
    assert r.keen_cost_credits == Decimal("69.666715")
    assert r.tokens_used == 56131 and r.context_tokens_used == 5613
    assert (r.iteration_count, r.tool_calls_count) == (6, 12)
    assert tree.rollup == r

    sub = await db.sessions.get_tree_rollup(alice.id, "a1")
    assert (sub.sessions, sub.max_depth, sub.height) == (2, 3, 1)
    assert sub.claude_cost_usd == Decimal("12.500007")
    assert (await db.sessions.get_session_tree(alice.id, "a1")).rollup == sub


async def test_admin_reads_any_tree(
    db: KeenDatabase, alice: User, admin: User, owner_conn: asyncpg.Connection
) -> None:
    await build_tree(db, alice, owner_conn)
    tree = await db.sessions.get_session_tree(admin.id, "root")
    assert tree.rollup.sessions == 6
    with pytest.raises(NotFound):
        await db.sessions.get_session_tree(admin.id, "nope")


# --- budgets ----------------------------------------------------------------------------------
async def test_budget_only_on_running_roots_and_exact(
    db: KeenDatabase, alice: User, owner_conn: asyncpg.Connection
) -> None:
    await db.sessions.create_session(alice.id, new("br"))
    await db.sessions.create_session(alice.id, new("br.1", "br"))
    s = await db.sessions.set_budget(alice.id, "br", "25.123456")
    assert s.credit_budget == Decimal("25.123456")
    with pytest.raises(InvalidInput):
        await db.sessions.set_budget(alice.id, "br.1", Decimal(5))
    for bad in (0.5, Decimal("-1"), Decimal(0), "abc", Decimal("1.0000001")):
        with pytest.raises(InvalidInput):
            # a float among the bad values: the wrong type is the point
            await db.sessions.set_budget(alice.id, "br", bad)  # type: ignore[arg-type]
    assert (await row(owner_conn, "br"))["credit_budget"] == Decimal("25.123456")
    await owner_conn.execute("UPDATE agent_sessions SET budget_used = 20 WHERE session_id = 'br'")
    with pytest.raises(InvalidInput):
        await db.sessions.set_budget(alice.id, "br", Decimal(19))
    cleared = await db.sessions.set_budget(alice.id, "br", None)
    assert cleared.credit_budget is None
    await db.sessions.cancel_session(alice.id, "br")
    with pytest.raises(SessionAlreadyEnded):
        await db.sessions.set_budget(alice.id, "br", Decimal(30))


# --- the sweep --------------------------------------------------------------------------------
async def test_sweep_times_out_only_idle_running_sessions(
    db: KeenDatabase, alice: User, bob: User, owner_conn: asyncpg.Connection
) -> None:
    for handle in ("idle", "busy", "ended"):
        await db.sessions.create_session(alice.id, new(handle))
    await db.sessions.create_session(bob.id, new("bob-idle"))
    await db.sessions.cancel_session(alice.id, "ended")
    await owner_conn.execute(
        "UPDATE agent_sessions SET last_activity_at = now() - interval '2 hours'"
        " WHERE session_id IN ('idle', 'bob-idle', 'ended')"
    )
    swept = await db.sessions.sweep_timed_out(timedelta(hours=1))
    assert sorted(s.session_handle for s in swept) == ["bob-idle", "idle"]
    idle = await row(owner_conn, "idle")
    assert idle["execution_status"] == "timed_out" and idle["success"] is False
    assert idle["end_time"] is not None
    assert idle["claude_cost_usd"] == 0 and idle["keen_cost_credits"] == 0
    assert (await row(owner_conn, "busy"))["execution_status"] == "running"
    assert (await row(owner_conn, "ended"))["execution_status"] == "cancelled"
    # Nothing is charged by the sweep.
    assert await owner_conn.fetchval("SELECT count(*) FROM credit_transactions") == 0
    assert await db.sessions.sweep_timed_out(timedelta(hours=1)) == []
    with pytest.raises(SessionAlreadyEnded):
        await db.sessions.update_progress(alice.id, "idle", iterations=1)
    with pytest.raises(InvalidInput):
        await db.sessions.sweep_timed_out(timedelta(0))


async def test_sweep_uses_the_configured_timeout(
    fresh_dsn: str, alice: User, owner_conn: asyncpg.Connection
) -> None:
    async with await KeenDatabase.connect(
        settings=make_settings(fresh_dsn, session_idle_timeout=60), migrate=False
    ) as db:
        await db.sessions.create_session(alice.id, new("t1"))
        await db.sessions.create_session(alice.id, new("t2"))
        await owner_conn.execute(
            "UPDATE agent_sessions SET last_activity_at = now() - interval '61 seconds'"
            " WHERE session_id = 't1'"
        )
        swept = await db.sessions.sweep_timed_out()
    assert [s.session_handle for s in swept] == ["t1"]
