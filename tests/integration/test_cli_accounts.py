"""`keen-stream users ...` and `keen-stream tokens ...`, run in-process on a fresh database."""

from __future__ import annotations

import asyncio
import io
import json
import uuid
from typing import Any

import asyncpg
import pytest

from keen_stream import cli
from keen_stream.dal.database import KeenDatabase
from keen_stream.settings import Settings
from tests.conftest import ADMIN_EMAIL, PASSWORD, make_settings


@pytest.fixture
async def ops(fresh_dsn: str) -> Settings:
    """Settings of a database with its super-admin, whom the commands act as."""
    settings = make_settings(fresh_dsn, admin_password="admin-password-long")
    assert await asyncio.to_thread(cli.main, ["create-admin"], settings=settings) == 0
    return settings


class Cli:
    def __init__(
        self, settings: Settings, capsys: pytest.CaptureFixture[str], mp: pytest.MonkeyPatch
    ):
        self.settings, self.capsys, self.mp = settings, capsys, mp

    async def __call__(self, *argv: str, stdin: str | None = None) -> tuple[int, str, str]:
        """Exit code, stdout, stderr of one command (``stdin``: what is piped to it)."""
        self.capsys.readouterr()
        if stdin is not None:
            self.mp.setattr("sys.stdin", io.StringIO(stdin))
        code = await asyncio.to_thread(cli.main, list(argv), settings=self.settings)
        out, err = self.capsys.readouterr()
        return code, out, err

    async def json(self, *argv: str, stdin: str | None = None) -> Any:
        code, out, err = await self(*argv, "--json", stdin=stdin)
        assert code == 0, err
        return json.loads(out)


@pytest.fixture
def run(ops: Settings, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Cli:
    return Cli(ops, capsys, monkeypatch)


async def test_an_operator_creates_a_user_and_issues_a_token_the_hub_accepts(
    run: Cli, ops: Settings
) -> None:
    created = await run.json(
        "users", "create", "Ada@Example.com", "--password-stdin", stdin=f"{PASSWORD}\n"
    )
    assert created["email"] == "ada@example.com" and created["username"] == "Ada"
    assert created["account_status"] == "active" and created["role"] == "user"
    assert list(created) == [
        "id", "email", "username", "display_name", "role", "is_admin", "account_status",
        "email_verified", "created_at", "last_login_at",
    ]  # fmt: skip

    code, token, err = await run("tokens", "issue", "ada@example.com", "--name", "laptop")
    assert code == 0, err
    token = token.strip()
    assert token.startswith("ks_api_") and "\n" not in token  # alone on stdout
    assert "shown only this once" in err and token not in err

    db = await KeenDatabase.connect(settings=ops, migrate=False)
    try:
        info = await db.tokens.validate(token, scopes=["stream"])  # what the hub asks
        assert str(info.user_id) == created["id"]
        user = await db.users.authenticate("ada@example.com", PASSWORD)  # the piped password
        assert str(user.id) == created["id"]
    finally:
        await db.close()

    listed = await run.json("tokens", "list", created["id"])
    assert [(t["token_name"], t["scopes"], t["is_active"]) for t in listed] == [
        ("laptop", ["stream"], True)
    ]
    code, out, _ = await run("tokens", "list", "ada@example.com")
    assert "laptop" in out and token not in out  # the plaintext is never shown again


async def test_users_list_and_show_as_json_and_tables(run: Cli) -> None:
    for name in ("bob", "cyd"):
        await run.json("users", "create", f"{name}@example.com", "--password-stdin", stdin=PASSWORD)
    listed = await run.json("users", "list")
    assert [u["email"] for u in listed] == [ADMIN_EMAIL, "bob@example.com", "cyd@example.com"]
    assert await run.json("users", "list", "--status", "suspended") == []
    code, out, _ = await run("users", "list")
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split() == ["ID", "EMAIL", "USERNAME", "ROLE", "STATUS", "CREATED"]
    assert len(rows) == 3 and "bob@example.com" in rows[1]

    shown = await run.json("users", "show", "bob@example.com")
    assert shown["credits"] == {
        "current": "0.000000",
        "held": "0.000000",
        "available": "0.000000",
        "lifetime_purchased": "0.000000",
        "lifetime_spent": "0.000000",
    }  # money as strings, exact
    assert shown["active_tokens"] == 0
    assert await run.json("users", "show", shown["id"]) == shown


async def test_suspending_a_user_stops_their_tokens_and_activating_restores_them(
    run: Cli, ops: Settings
) -> None:
    user = await run.json("users", "create", "dee@example.com", "--password-stdin", stdin=PASSWORD)
    issued = await run.json("tokens", "issue", user["id"])
    assert issued["token"].startswith("ks_api_") and issued["user_id"] == user["id"]
    db = await KeenDatabase.connect(settings=ops, migrate=False)
    try:
        suspended = await run.json("users", "suspend", "dee@example.com")
        assert suspended["account_status"] == "suspended"
        with pytest.raises(Exception, match="not active"):
            await db.tokens.validate(issued["token"])
        assert (await run.json("users", "activate", user["id"]))["account_status"] == "active"
        await db.tokens.validate(issued["token"])

        revoked = await run.json("tokens", "revoke", "dee@example.com", issued["id"])
        assert revoked["is_active"] is False and revoked["revoked_at"] is not None
        with pytest.raises(Exception, match="revoked"):
            await db.tokens.validate(issued["token"])
        assert await run.json("tokens", "list", user["id"]) == []
        assert len(await run.json("tokens", "list", user["id"], "--all")) == 1
    finally:
        await db.close()


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (("users", "show", "nobody@example.com"), 3, "no user nobody@example.com"),
        (("users", "show", str(uuid.UUID(int=1))), 3, f"no user {uuid.UUID(int=1)}"),
        (("users", "suspend", "not-a-uuid"), 2, "'not-a-uuid' is neither an email nor a user id"),
        (("tokens", "revoke", "eve@example.com", "nope"), 2, "token_id is not a valid UUID"),
        (("tokens", "revoke", "eve@example.com", str(uuid.UUID(int=2))), 3, "no such token"),
        (("users", "list", "--status", "gone"), 2, "unknown account status 'gone'"),
        (("tokens", "issue", "eve@example.com", "--expires-in-days", "0"), 2, "expires-in-days"),
        (("users", "list", "--admin-email", "eve@example.com"), 2, "is not an active admin"),
    ],
)
async def test_a_bad_request_is_one_line_and_an_exit_code(
    run: Cli, argv: tuple[str, ...], code: int, message: str
) -> None:
    await run.json("users", "create", "eve@example.com", "--password-stdin", stdin=PASSWORD)
    got, out, err = await run(*argv)
    assert (got, out) == (code, "")
    assert err.startswith("keen-stream: ") and message in err, err
    assert err.count("\n") == 1  # one line, no traceback


async def test_create_refuses_bad_input_and_changes_nothing(run: Cli, fresh_dsn: str) -> None:
    await run.json("users", "create", "fay@example.com", "--password-stdin", stdin=PASSWORD)
    for argv, stdin, message in [
        (("fay@example.com",), PASSWORD, "already exists"),
        (("not-an-email",), PASSWORD, "email"),
        (("gil@example.com",), "short\n", "password"),
        (("gil@example.com", "--username", "x"), PASSWORD, "username"),
        (("cy@example.com",), PASSWORD, "not a valid username (3 to 64 letters"),
    ]:
        code, out, err = await run("users", "create", *argv, "--password-stdin", stdin=stdin)
        assert (code, out) == (2, ""), err
        assert message in err and err.count("\n") == 1, err
    # No terminal to prompt on and no --password-stdin: refused before anything is written.
    code, _, err = await run("users", "create", "gil@example.com", stdin="")
    assert code == 2 and "--password-stdin" in err
    conn = await asyncpg.connect(fresh_dsn)
    try:
        assert await conn.fetchval("SELECT count(*) FROM users") == 2  # the admin and fay
    finally:
        await conn.close()


async def test_commands_that_act_as_the_admin_need_one(
    fresh_dsn: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run = Cli(make_settings(fresh_dsn), capsys, monkeypatch)
    # A registration needs no admin; everything else does, and says how to make one.
    await run.json("users", "create", "hal@example.com", "--password-stdin", stdin=PASSWORD)
    code, _, err = await run("tokens", "issue", "hal@example.com")
    assert code == 2 and "keen-stream create-admin" in err
