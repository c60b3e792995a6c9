"""Server-sent events vs WebSockets: the hub's CPU per delivered event, same hub, same run.

    python load_tests/sse_bench.py [--dsn ADMIN_DSN] [--clients 100] [--events 2000] [--rounds 3]

Creates a scratch database (migrated to head), one user with one agent session, starts
``keen-stream serve`` as a subprocess, then twice: ``--clients`` subscribers (first WebSockets on
/ws, then event streams on GET /events), every one subscribed to the user's events; the DAL
writes ``--events`` session updates as fast as it can; the run ends when every client has them
all. ``--rounds`` repeats the pair (alternating which goes first). Printed for each: deliveries,
wall time, the hub process's CPU per delivery, and the SSE figure as a ratio of the WebSocket
one (the baseline) per round and their median. Absolute numbers drift on a shared machine: read
the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from websockets.asyncio.client import connect

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from keen_stream.dal.database import KeenDatabase
from keen_stream.migrate import upgrade
from keen_stream.settings import Settings, with_database
from load_tests.fanout_bench import cpu, free_port, wait_port

ROOT = Path(__file__).resolve().parent.parent


async def ws_client(url: str, token: str, events: int, ready: asyncio.Event, n: list[int]) -> None:
    async with connect(url, additional_headers={"Authorization": f"Bearer {token}"}) as ws:
        await ws.recv()
        await ws.send(json.dumps({"type": "subscribe"}))
        await ws.recv()
        n[0] += 1
        if n[0] == n[1]:
            ready.set()
        got = 0
        while got < events:
            if '"type":"event"' in await ws.recv():
                got += 1


async def sse_client(
    http: httpx.AsyncClient, token: str, events: int, ready: asyncio.Event, n: list[int]
) -> None:
    headers = {"Authorization": f"Bearer {token}"}
    async with http.stream("GET", "/events", headers=headers) as response:
        got = 0
        async for line in response.aiter_lines():
            if line.startswith("event: subscribed"):
                n[0] += 1
                if n[0] == n[1]:
                    ready.set()
            elif line.startswith("id: ") and n[0]:
                got += 1
                if got == events + 1:  # the subscribed frame's id, then one per event
                    return


async def run(kind: str, port: int, pid: int, dsn: str, token: str, args: Any) -> dict[str, float]:
    ready = asyncio.Event()
    n = [0, args.clients]
    limits = httpx.Limits(max_connections=args.clients + 10)
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", timeout=120, limits=limits
    ) as http:
        if kind == "ws":
            url = f"ws://127.0.0.1:{port}/ws"
            tasks = [ws_client(url, token, args.events, ready, n) for _ in range(args.clients)]
        else:
            tasks = [sse_client(http, token, args.events, ready, n) for _ in range(args.clients)]
        clients = [asyncio.ensure_future(t) for t in tasks]
        await asyncio.wait_for(ready.wait(), 60)
        await asyncio.sleep(1.0)
        settings = Settings(database_url=dsn)
        db = await KeenDatabase.connect(settings=settings, migrate=False)
        try:
            cpu0, t0 = cpu(pid), time.perf_counter()
            for _ in range(args.events):
                await db.sessions.update_progress(args.user, "bench", iterations=1)
            await asyncio.wait_for(asyncio.gather(*clients), 300)
            cpu1, t1 = cpu(pid), time.perf_counter()
        finally:
            await db.close()
    deliveries = args.clients * args.events
    return {
        "deliveries": deliveries,
        "seconds": t1 - t0,
        "us_cpu_per_delivery": (cpu1 - cpu0) / deliveries * 1e6,
    }


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default="postgresql://127.0.0.1:5432/postgres")
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    name = f"keen_sse_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    admin = await asyncpg.connect(args.dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    dsn = with_database(args.dsn, name)
    try:
        await asyncio.to_thread(upgrade, dsn)
        db = await KeenDatabase.connect(settings=Settings(database_url=dsn), migrate=False)
        try:
            user = await db.users.create(
                email="bench@example.com", username="bench", password="x" * 12
            )
            await db.sessions.create_session(
                user.id, session_handle="bench", vision="v", working_directory="/w", git_branch="m"
            )
            issued = await db.tokens.issue(user.id, "session", scopes=["stream"])
            token = issued.token.get_secret_value()
        finally:
            await db.close()
        args.user = user.id
        port = free_port()
        env = {
            **os.environ,
            "KEEN_DATABASE_URL": dsn,
            "KEEN_HUB_MAX_CONNECTIONS_PER_ADDRESS": "0",
            "KEEN_HUB_MAX_UNAUTHENTICATED": "0",
        }
        hub = subprocess.Popen(  # noqa: ASYNC220
            [
                sys.executable,
                "-m",
                "keen_stream",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            env=env,
            cwd=ROOT,
        )
        try:
            await wait_port(port)
            await asyncio.sleep(1.0)
            results: list[tuple[dict[str, float], dict[str, float]]] = []
            for n in range(args.rounds):
                order = ("ws", "sse") if n % 2 == 0 else ("sse", "ws")
                pair = {kind: await run(kind, port, hub.pid, dsn, token, args) for kind in order}
                results.append((pair["ws"], pair["sse"]))
        finally:
            hub.send_signal(signal.SIGTERM)
            try:
                hub.wait(timeout=30)
            except subprocess.TimeoutExpired:
                hub.kill()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    print(f"{args.clients} clients x {args.events} events, {os.cpu_count()} CPUs")
    print(f"{'':<16}{'deliveries':>12}{'seconds':>10}{'us CPU/delivery':>17}")
    ratios = []
    for n, (ws, sse) in enumerate(results, 1):
        for label, r in ((f"{n} WebSocket", ws), (f"{n} SSE", sse)):
            print(
                f"{label:<16}{r['deliveries']:>12.0f}{r['seconds']:>10.2f}"
                f"{r['us_cpu_per_delivery']:>17.2f}"
            )
        # CPU time is counted in ticks: a run too small to measure has no ratio.
        base = ws["us_cpu_per_delivery"]
        ratios.append(sse["us_cpu_per_delivery"] / base if base else float("nan"))
    print("SSE / WebSocket hub CPU per delivery: " + ", ".join(f"{r:.2f}" for r in ratios))
    print(f"median: {statistics.median(ratios):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
