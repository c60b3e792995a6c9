"""``python -m keen_stream serve`` as a real process on the embedded PostgreSQL, and the
processes an embedded data directory has running (its server, its watchdog)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import httpx
import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def start_serve(
    data_dir: Path | None, port: int, *args: str, env: dict[str, str] | None = None
) -> asyncio.subprocess.Process:
    """The README's hub command, with KEEN_DATABASE_URL unset: the embedded server in data_dir
    (or, with ``data_dir`` None, whatever ``env`` configures); output on stdout."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("KEEN_")}
    if data_dir is not None:
        environ["KEEN_EMBEDDED_DIR"] = str(data_dir)
    environ.update(env or {})
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "keen_stream",
        "serve",
        "--port",
        str(port),
        *args,
        env=environ,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )


async def wait_healthy(proc: asyncio.subprocess.Process, port: int) -> dict[str, Any]:
    """``/healthz``'s body once the hub answers 200 (fails if the process exits first)."""
    async with httpx.AsyncClient() as client:
        for _ in range(600):
            try:
                response = await client.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
                if response.status_code == 200:
                    body: dict[str, Any] = response.json()
                    return body
            except httpx.TransportError:
                pass
            assert proc.returncode is None, (await proc.stdout.read()).decode()  # type: ignore[union-attr]
            await asyncio.sleep(0.1)
    raise AssertionError("hub never became healthy")


def postmaster(data_dir: Path) -> psutil.Process | None:
    """The embedded server running on ``data_dir``, if any."""
    try:
        process = psutil.Process(int((data_dir / "postmaster.pid").read_text().split("\n")[0]))
        return process if process.status() != psutil.STATUS_ZOMBIE else None
    except (OSError, ValueError, psutil.NoSuchProcess):
        return None


def watchdogs(data_dir: Path) -> list[psutil.Process]:
    """The watchdog processes of ``data_dir`` (keen_stream/embedded.py --watch DIR)."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        cmdline = process.info["cmdline"] or []
        if (
            "--watch" in cmdline
            and str(data_dir) in cmdline
            and process.info["status"] != psutil.STATUS_ZOMBIE
        ):
            found.append(process)
    return found


def kill_leftovers(data_dir: Path) -> None:
    """Stop whatever still runs on ``data_dir`` (after a failed test: leave nothing behind)."""
    for process in watchdogs(data_dir):
        process.kill()
    server = postmaster(data_dir)
    if server is not None:
        server.send_signal(signal.SIGQUIT)  # immediate shutdown
        server.wait(30)
