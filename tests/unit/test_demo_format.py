"""``keen-stream demo``'s event lines: what a watcher prints for each event it receives."""

from __future__ import annotations

import os
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from keen_stream.client import Event
from keen_stream.dal.models.analytics import (
    AdminAnalytics,
    ContextUsage,
    CostAnalysis,
    RecursionMetrics,
    SessionMetrics,
    UserMetrics,
)
from keen_stream.demo import (
    Output,
    WatchedSession,
    format_analytics,
    format_event,
    session_label,
    tree_cell,
)

ALICE = uuid.uuid4()
ROOT = uuid.uuid4()
CHILD = uuid.uuid4()
NAMES = {ALICE: "alice"}


def event(event_type: str, session: uuid.UUID | None, **data: Any) -> Event:
    return Event(
        cursor="100-1",
        version=1,
        event_type=event_type,
        user_id=ALICE,
        session_id=session,
        root_session_id=ROOT if session else None,
        time=datetime(2026, 12, 1, 3, 4, 5, 678000, tzinfo=UTC),
        data=data,
    )


def session_data(handle: str, depth: int, parent: uuid.UUID | None = None, **more: Any) -> Any:
    return {
        "session_handle": handle,
        "parent_session_id": str(parent) if parent else None,
        "depth": depth,
        "phase": "EXPLORE",
        "status": "running",
        "iteration_count": 0,
        "tool_calls_count": 0,
        "tokens_used": 0,
        "credit_budget": None,
        "budget_used": "0.000000",
        "keen_cost_credits": "0.000000",
        "claude_cost_usd": "0.000000",
        **more,
    }


def test_labels_drop_the_user_and_the_random_suffix_and_indent_by_depth() -> None:
    assert session_label("alice-build-3f9a2c") == "build"
    assert session_label("alice-two-words-3f9a2c") == "two-words"
    assert session_label("nodashes") == "nodashes"
    assert tree_cell("root", 0) == "root"
    assert tree_cell("build", 1) == "└─ build"
    assert tree_cell("tests", 2) == "  └─ tests"


def test_a_watcher_places_events_in_the_tree_it_learnt_from_the_stream() -> None:
    seen: dict[uuid.UUID, WatchedSession] = {}
    root = format_event(
        event("session.created", ROOT, **session_data("alice-root-aa", 0)), NAMES, seen
    )
    child = format_event(
        event("session.created", CHILD, **session_data("alice-lint-bb", 1, ROOT)), NAMES, seen
    )
    assert "alice  root" in root and "EXPLORE, root" in root
    assert "└─ lint" in child and "sub-agent of root" in child
    assert seen[CHILD] == WatchedSession("lint", 1)

    charge = format_event(
        event(
            "credit.usage",
            CHILD,
            amount="-0.100000",
            balance_after="45.950000",
            description="model call in lint",
        ),
        NAMES,
        seen,
    )
    # the money exactly as the hub sent it (decimal strings), under the session it belongs to
    assert "└─ lint" in charge and "credit.usage" in charge
    assert charge.endswith("-0.100000 cr, balance 45.950000")

    purchase = format_event(
        event("credit.purchase", None, amount="50.000000", balance_after="50.000000"), NAMES, {}
    )
    assert "(account)" in purchase


def test_a_failed_sub_agent_says_so_with_its_error_and_its_charge() -> None:
    seen = {CHILD: WatchedSession("lint", 2)}
    line = format_event(
        event(
            "session.completed",
            CHILD,
            **session_data(
                "alice-lint-bb",
                2,
                status="failed",
                success=False,
                error_message="ruff crashed",
                keen_cost_credits="0.100000",
                claude_cost_usd="0.020000",
            ),
        ),
        NAMES,
        seen,
    )
    assert "  └─ lint" in line
    assert "FAILED: ruff crashed" in line
    assert line.endswith("charged 0.100000 cr ($0.020000)")


def test_progress_and_phase_lines_show_counters_and_the_trees_budget() -> None:
    seen = {ROOT: WatchedSession("root", 0)}
    progress = format_event(
        event(
            "session.progress",
            ROOT,
            **session_data(
                "alice-root-aa",
                0,
                iteration_count=2,
                tool_calls_count=4,
                tokens_used=6800,
                credit_budget="25.000000",
                budget_used="3.100000",
            ),
        ),
        NAMES,
        seen,
    )
    assert "iterations 2  tools 4  tokens 6800" in progress
    assert progress.endswith("budget 3.100000 of 25.000000 cr")
    phase = format_event(
        event(
            "session.phase_changed",
            ROOT,
            **session_data("alice-root-aa", 0, phase="PLAN", previous_phase="EXPLORE"),
        ),
        NAMES,
        seen,
    )
    assert "EXPLORE → PLAN" in phase
    assert "budget" not in phase  # no budget, no money column


def test_the_analytics_print_money_as_decimal_strings() -> None:
    now = datetime(2026, 12, 1, tzinfo=UTC)
    analytics = AdminAnalytics(
        time_range="day",
        window_start=now,
        window_end=now,
        user_metrics=UserMetrics(total_users=3, active_users=2, new_users=3),
        session_metrics=SessionMetrics(
            total_sessions=7,
            successful_sessions=6,
            failed_sessions=1,
            cancelled_sessions=0,
            timed_out_sessions=0,
            running_sessions=0,
            admin_sessions=0,
            avg_session_duration_minutes=None,
        ),
        recursion_metrics=RecursionMetrics(
            total_recursive_sessions=5, avg_recursion_depth=Decimal("1.40"), max_recursion_depth=2
        ),
        cost_analysis=CostAnalysis(
            total_claude_costs=Decimal("0.250000"),
            total_credit_revenue=Decimal("1.250000"),
            markup_effectiveness=Decimal("5.0000"),
            credits_purchased=Decimal("70.000000"),
            credits_used=Decimal("5.400000"),
            admin_bypasses=0,
            admin_bypass_claude_costs=Decimal("0"),
        ),
        context_usage=ContextUsage(
            total_tokens=29200, context_tokens=10000, context_utilization_rate=Decimal("0.3425")
        ),
    )
    text = "\n".join(format_analytics(analytics))
    assert "7 started: 6 completed, 1 failed" in text
    assert "Claude $0.250000 -> 1.250000 credits (markup 5.0000)" in text
    assert "70.000000 credits purchased, 5.400000 used" in text
    assert "deepest 2" in text


def test_output_carries_on_quietly_when_its_reader_has_gone() -> None:
    """`keen-stream demo | head`: the demo must still finish and clean up, without a traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    with open(write_end, "w") as stream:
        out = Output(stream)
        out.say("first")  # the pipe is broken: this write fails
        assert out.gone
        out.say("second")  # and nothing tries it again
        out.blank()
