"""The README's hub command: `python -m keen_stream serve` on the embedded PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path

import httpx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_serve_starts_on_embedded_postgres_and_stops_cleanly(tmp_path: Path) -> None:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEEN_")}
    env["KEEN_EMBEDDED_DIR"] = str(tmp_path / "pgdata")  # KEEN_DATABASE_URL unset: embedded
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "keen_stream",
        "serve",
        "--port",
        str(port),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        body = None
        async with httpx.AsyncClient() as client:
            for _ in range(600):
                try:
                    response = await client.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
                    if response.status_code == 200:
                        body = response.json()
                        break
                except httpx.TransportError:
                    pass
                assert proc.returncode is None, (await proc.stdout.read()).decode()  # type: ignore[union-attr]
                await asyncio.sleep(0.1)
            assert body is not None, "hub never became healthy"
            assert body["database"]["ok"] is True
            assert body["database"]["embedded"] is True
            metrics = await client.get(f"http://127.0.0.1:{port}/metrics")
            assert metrics.status_code == 200
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        output = (await asyncio.wait_for(proc.communicate(), 60))[0].decode()
    # uvicorn shuts down gracefully, then re-raises the signal it caught (so exit is -SIGTERM).
    assert proc.returncode in (0, -signal.SIGTERM), output
    pgdata = tmp_path / "pgdata"
    assert (pgdata / "PG_VERSION").exists()  # kept for the next run
    for _ in range(100):  # the embedded server was stopped with the hub
        if not (pgdata / "postmaster.pid").exists():
            break
        await asyncio.sleep(0.1)
    assert not (pgdata / "postmaster.pid").exists(), "embedded PostgreSQL left running"
