"""The README's hub command: `python -m keen_stream serve` on the embedded PostgreSQL."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import httpx

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
