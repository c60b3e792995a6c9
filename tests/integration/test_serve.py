"""The README's hub command: `python -m keen_stream serve` on the embedded PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import httpx
import websockets

from keen_stream.dal.database import KeenDatabase
from keen_stream.migrate import heads
from keen_stream.settings import redact_dsn
from tests.conftest import PASSWORD, make_settings
from tests.integration.servekit import free_port, start_serve, wait_healthy


async def test_serve_starts_on_embedded_postgres_and_stops_cleanly(embedded_dir: Path) -> None:
    port = free_port()
    proc = await start_serve(embedded_dir, port)
    try:
        body = await wait_healthy(proc, port)
        assert body["database"]["ok"] is True
        assert body["database"]["embedded"] is True
        async with httpx.AsyncClient() as client:
            metrics = await client.get(f"http://127.0.0.1:{port}/metrics")
            assert metrics.status_code == 200
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        output = (await asyncio.wait_for(proc.communicate(), 60))[0].decode()
    # uvicorn shuts down gracefully, then re-raises the signal it caught (so exit is -SIGTERM).
    assert proc.returncode in (0, -signal.SIGTERM), output
    pgdata = embedded_dir
    assert (pgdata / "PG_VERSION").exists()  # kept for the next run
    for _ in range(100):  # the embedded server was stopped with the hub
        if not (pgdata / "postmaster.pid").exists():
            break
        await asyncio.sleep(0.1)
    assert not (pgdata / "postmaster.pid").exists(), "embedded PostgreSQL left running"


async def _exit_output(proc: asyncio.subprocess.Process) -> str:
    return (await asyncio.wait_for(proc.communicate(), 60))[0].decode()


async def _stop(proc: asyncio.subprocess.Process) -> str:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    return await _exit_output(proc)


async def test_serve_refuses_an_unmigrated_database_in_one_line(empty_dsn: str) -> None:
    proc = await start_serve(None, free_port(), env={"KEEN_DATABASE_URL": empty_dsn})
    output = await _exit_output(proc)
    assert proc.returncode == 2, output
    assert "Traceback" not in output
    last = output.strip().splitlines()[-1]
    assert last.startswith("keen-stream: cannot serve on ")
    assert "not migrated" in last and "keen-stream migrate" in last


async def test_serve_refuses_a_database_behind_this_release(empty_dsn: str) -> None:
    from keen_stream.migrate import upgrade_async

    await upgrade_async(empty_dsn, "0007_guarantees")
    proc = await start_serve(None, free_port(), env={"KEEN_DATABASE_URL": empty_dsn})
    output = await _exit_output(proc)
    assert proc.returncode == 2, output
    last = output.strip().splitlines()[-1]
    assert "schema is at revision 0007_guarantees" in last, output
    assert "keen-stream migrate" in last and "Traceback" not in output


async def test_serve_names_an_unreachable_database_without_its_password() -> None:
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    dsn = f"postgresql://keen:hunter2-secret@127.0.0.1:{port}/keen"
    proc = await start_serve(None, free_port(), env={"KEEN_DATABASE_URL": dsn})
    output = await _exit_output(proc)
    assert proc.returncode == 2, output
    assert "Traceback" not in output and "hunter2" not in output
    assert f"cannot serve on postgresql://keen:***@127.0.0.1:{port}/keen" in output
    assert "Connection refused" in output


async def test_serve_refuses_an_unsafe_database(fresh_dsn: str) -> None:
    admin = await asyncpg.connect(fresh_dsn)
    try:  # the default grant a plain restore gives back: keen_app could shadow tables
        await admin.execute(f'GRANT TEMPORARY ON DATABASE "{_name(fresh_dsn)}" TO PUBLIC')
    finally:
        await admin.close()
    proc = await start_serve(None, free_port(), env={"KEEN_DATABASE_URL": fresh_dsn})
    output = await _exit_output(proc)
    assert proc.returncode == 2, output
    assert "can create temporary tables" in output and "Traceback" not in output


async def test_serve_logs_its_start_and_each_connection_as_json(fresh_dsn: str) -> None:
    db = await KeenDatabase.connect(settings=make_settings(fresh_dsn), migrate=False)
    try:
        user = await db.users.create(email="ops@example.com", username="ops", password=PASSWORD)
        token = (await db.tokens.issue(user.id, "api_key", scopes=["stream"])).token
    finally:
        await db.close()
    port = free_port()
    env = {"KEEN_DATABASE_URL": fresh_dsn}
    proc = await start_serve(None, port, "--log-format", "json", env=env)
    try:
        await wait_healthy(proc, port)
        async with websockets.connect(
            f"ws://127.0.0.1:{port}/ws",
            additional_headers={"Authorization": f"Bearer {token.get_secret_value()}"},
        ) as ws:
            ready = json.loads(await ws.recv())
            assert ready["type"] == "ready"
            local_port = ws.local_address[1]
        async with httpx.AsyncClient() as client:  # the close is logged once the hub sees it
            for _ in range(100):
                health = (await client.get(f"http://127.0.0.1:{port}/healthz")).json()
                if health["connections"] == 0:
                    break
                await asyncio.sleep(0.05)
    finally:
        output = await _stop(proc)
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert len(lines) == len(output.strip().splitlines()), output  # every line is JSON
    started = next(line for line in lines if line.get("event") == "hub.started")
    assert started["level"] == "INFO" and started["logger"] == "keen_stream.hub.cli"
    assert started["listen"] == [f"127.0.0.1:{port}"]
    assert started["database"] == redact_dsn(fresh_dsn)
    assert started["schema_revision"] == heads()[0]
    assert uuid.UUID(started["node_id"])
    opened = next(line for line in lines if line.get("event") == "ws.open")
    closed = next(line for line in lines if line.get("event") == "ws.close")
    assert opened["user_id"] == closed["user_id"] == str(user.id)
    assert opened["connection_id"] == closed["connection_id"] == ready["connection_id"]
    assert opened["remote"] == closed["remote"] == f"127.0.0.1:{local_port}"
    assert closed["close_code"] == 1000
    assert closed["duration_s"] >= 0


async def test_serve_logs_text_lines_by_default(fresh_dsn: str) -> None:
    port = free_port()
    proc = await start_serve(None, port, env={"KEEN_DATABASE_URL": fresh_dsn})
    try:
        await wait_healthy(proc, port)
    finally:
        output = await _stop(proc)
    line = next(line for line in output.splitlines() if "hub listening" in line)
    assert " INFO keen_stream.hub.cli: hub listening on " in line
    assert f"http://127.0.0.1:{port}" in line and f"schema revision {heads()[0]}" in line


def _name(dsn: str) -> str:
    return urlsplit(dsn).path.lstrip("/")


async def test_serve_on_a_port_in_use_says_so_and_exits_1(fresh_dsn: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proc = await start_serve(None, taken.getsockname()[1], env={"KEEN_DATABASE_URL": fresh_dsn})
        output = await _exit_output(proc)
    assert proc.returncode == 1, output
    assert "address already in use" in output and "Traceback" not in output
