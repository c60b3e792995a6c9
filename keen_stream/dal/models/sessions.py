"""Agent sessions: what the agent core sends in, and what the DAL hands back."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any, Final, Literal, TypedDict

from pydantic import BaseModel, ConfigDict, Field, field_validator

from keen_stream.dal.validation import SESSION_HANDLE_PATTERN, parse_money, storable
from keen_stream.errors import InvalidInput

#: The agent's phases, in the order an agent normally goes through them. EXPLORE is where every
#: session starts; the schema's CHECK constraint holds the same set.
Phase = Literal["EXPLORE", "PLAN", "SUMMON", "COMPLETE"]
PHASES: Final[tuple[str, ...]] = ("EXPLORE", "PLAN", "SUMMON", "COMPLETE")
ExecutionStatus = Literal["running", "completed", "failed", "cancelled", "timed_out"]
STATUSES: Final[tuple[str, ...]] = ("running", "completed", "failed", "cancelled", "timed_out")

# Mirrored by CHECK constraints in keen_stream/migrations/versions/0003_sessions.py.
MAX_VISION: Final = 100_000
MAX_PATH: Final = 4096
MAX_BRANCH: Final = 255
MAX_ERROR_MESSAGE: Final = 10_000
MAX_REPORT_BYTES: Final = 1_048_576
#: Per call; the stored arrays are capped at 10,000 entries each by the schema.
MAX_FILES_PER_CALL: Final = 1000


def _text(value: str, what: str) -> str:
    # Refused here (a ValueError becomes pydantic's error) rather than by the driver.
    if not storable(value):
        raise ValueError(f"{what} must not contain NUL characters or lone surrogates")
    return value


def parse_paths(value: Any, what: str) -> list[str]:
    """A list of file paths for the files_* arrays: strings, no NUL, bounded in size."""
    if isinstance(value, str | bytes) or not hasattr(value, "__iter__"):
        raise InvalidInput(f"{what} must be a list of paths", field=what)
    paths = list(value)
    if len(paths) > MAX_FILES_PER_CALL:
        raise InvalidInput(f"{what}: at most {MAX_FILES_PER_CALL} paths per call", field=what)
    for path in paths:
        if not isinstance(path, str) or not 1 <= len(path) <= MAX_PATH or not storable(path):
            raise InvalidInput(
                f"{what}: each path must be a string of 1 to {MAX_PATH} characters without NUL",
                field=what,
            )
    return paths


def _json_default(value: Any) -> str:
    # What the DAL's jsonb codec accepts beyond plain JSON (keen_stream.dal.database.dumps).
    if isinstance(value, Decimal | uuid.UUID):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


class _Input(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class SessionCreate(_Input):
    """A new session, named by the caller's handle; ``parent_session_handle`` is the parent's."""

    session_handle: str = Field(pattern=SESSION_HANDLE_PATTERN)
    vision: str = Field(min_length=1, max_length=MAX_VISION)
    working_directory: str = Field(min_length=1, max_length=MAX_PATH)
    git_branch: str = Field(min_length=1, max_length=MAX_BRANCH)
    parent_session_handle: str | None = Field(default=None, pattern=SESSION_HANDLE_PATTERN)
    streaming_enabled: bool = True

    @field_validator("vision", "working_directory", "git_branch")
    @classmethod
    def _no_nul(cls, value: str) -> str:
        return _text(value, "text")


class SessionCompletion(_Input):
    """How a session ended and what it cost (Claude's price in USD; the ledger adds the markup).

    The credit cost is never taken from the caller: the ledger computes it (or records an admin
    bypass) in the same transaction that ends the session.
    """

    success: bool
    claude_cost_usd: Decimal
    files_created: tuple[str, ...] = ()
    files_modified: tuple[str, ...] = ()
    files_deleted: tuple[str, ...] = ()
    completion_report: dict[str, Any] | None = None
    error_message: str | None = Field(default=None, max_length=MAX_ERROR_MESSAGE)

    @field_validator("claude_cost_usd", mode="before")
    @classmethod
    def _money(cls, value: Any) -> Decimal:
        return parse_money(value, "claude_cost_usd", allow_zero=True)

    @field_validator("files_created", "files_modified", "files_deleted", mode="before")
    @classmethod
    def _paths(cls, value: Any) -> tuple[str, ...]:
        return tuple(parse_paths(value, "files"))

    @field_validator("completion_report")
    @classmethod
    def _report(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            try:
                size = len(json.dumps(value, default=_json_default).encode())
            except (TypeError, ValueError):
                raise ValueError("completion_report must be JSON-serialisable") from None
            if size > MAX_REPORT_BYTES:
                raise ValueError(f"completion_report is larger than {MAX_REPORT_BYTES} bytes")
        return value

    @field_validator("error_message")
    @classmethod
    def _no_nul(cls, value: str | None) -> str | None:
        return None if value is None else _text(value, "error_message")


# The keyword arguments the DAO methods accept in place of a model, typed for the caller's
# checker (tests/unit/test_models.py keeps each the same as its model).
class SessionCreateFields(TypedDict, total=False):
    session_handle: str
    vision: str
    working_directory: str
    git_branch: str
    parent_session_handle: str | None
    streaming_enabled: bool


class SessionCompletionFields(TypedDict, total=False):
    success: bool
    claude_cost_usd: Decimal | int | str
    files_created: Sequence[str]
    files_modified: Sequence[str]
    files_deleted: Sequence[str]
    completion_report: dict[str, Any] | None
    error_message: str | None


class AgentSession(BaseModel):
    """A session row. Unknown columns (added by later migrations) are ignored."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    id: uuid.UUID
    user_id: uuid.UUID
    #: The caller's handle (the schema's ``session_id`` column); ``id`` is the row's UUID.
    session_handle: str
    parent_session_id: uuid.UUID | None
    root_session_id: uuid.UUID
    session_depth: int
    git_branch: str
    vision: str
    working_directory: str
    current_phase: Phase
    start_time: datetime
    end_time: datetime | None
    last_activity_at: datetime
    iteration_count: int
    tool_calls_count: int
    claude_cost_usd: Decimal
    keen_cost_credits: Decimal
    tokens_used: int
    context_tokens_used: int
    files_modified: list[str]
    files_created: list[str]
    files_deleted: list[str]
    execution_status: ExecutionStatus
    success: bool | None
    error_message: str | None
    completion_report: dict[str, Any] | None
    streaming_enabled: bool
    websocket_connections: list[str]
    is_admin_session: bool
    bypass_credit_deduction: bool
    credit_budget: Decimal | None
    budget_used: Decimal
    created_at: datetime
    updated_at: datetime

    @property
    def is_root(self) -> bool:
        return self.parent_session_id is None


class SessionRollup(BaseModel):
    """Totals over a session and all its descendants, summed exactly by the database."""

    model_config = ConfigDict(frozen=True)

    session_handle: str
    sessions: int
    running: int
    completed: int
    failed: int
    cancelled: int
    timed_out: int
    #: The deepest ``session_depth`` in the subtree, and how many levels lie below its top.
    max_depth: int
    height: int
    claude_cost_usd: Decimal
    keen_cost_credits: Decimal
    tokens_used: int
    context_tokens_used: int
    iteration_count: int
    tool_calls_count: int
    #: The top session's budget (only roots have one) and what the ledger has counted against it.
    credit_budget: Decimal | None
    budget_used: Decimal


class SessionNode(BaseModel):
    model_config = ConfigDict(frozen=True)

    session: AgentSession
    children: list[SessionNode] = Field(default_factory=list)


class SessionTree(BaseModel):
    """A session with its descendants nested, children oldest first, and the subtree roll-up."""

    model_config = ConfigDict(frozen=True)

    root: SessionNode
    rollup: SessionRollup

    def walk(self) -> Iterator[AgentSession]:
        """Every session in the tree, depth first, parents before children."""
        stack = [self.root]
        while stack:
            node = stack.pop()
            yield node.session
            stack.extend(reversed(node.children))
