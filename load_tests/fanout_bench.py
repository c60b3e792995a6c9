"""Fan-out: the keen hub vs a bare ``websockets.broadcast`` server, same clients, same run.

    python load_tests/fanout_bench.py [--dsn ADMIN_DSN] [--subscribers 1000] [--rate 500]
                                      [--users 50] [--seconds 15] [--procs 2] [--idle-only]
                                      [--writes call[,transaction,...]] [--skip-bare]

Creates a scratch database (migrated to head), ``--users`` users with one agent session each and
one stream token per subscriber, and starts ``keen-stream serve`` as a subprocess. Subscribers
(spread over ``--procs`` load-generator processes) each subscribe to their user's events; a
writer updates sessions through the DAL (``db.sessions.update_progress``) at ``--rate`` events/s
round-robin over the users, so each event goes to subscribers/users clients. The baseline is a
bare ``websockets.asyncio.server`` that broadcasts frames of the same size to the same groups at
the same rate (no database), driven by the same load generators.

Printed for each: delivered frames/s, latency p50/p99 (hub: writer's commit returned -> client
received; bare: broadcast call -> client received), server CPU per delivery and deliveries per
server CPU-second (the throughput ratio), and the server's RSS per idle connection. Absolute
numbers drift between runs on shared machines: read the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from keen_stream.dal.database import KeenDatabase
from keen_stream.dal.sessions import SQL as SESSION_SQL
from keen_stream.migrate import upgrade
from keen_stream.settings import Settings, with_database

ROOT = Path(__file__).resolve().parent.parent
HUB_FIELDS = re.compile(r'"type":"event".*?"user_id":"([0-9a-f-]{36})"')
ITERATIONS = re.compile(r'"iteration_count": ?(\d+)')
BARE_SENT = re.compile(r'"t": ?([0-9.]+)')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --- load generator (one process, many connections) ----------------------------------------
def generator_main(*args: Any) -> None:
    """A generator process's entry point: ``_generator(*args)`` on uvloop when available."""
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    asyncio.run(_generator(*args))


async def _generator(
    mode: str,
    url: str,
    clients: list[tuple[int, str]],
    user_ids: list[str],
    connected: Any,
    go: Any,
    stop: Any,
    results: Any,
) -> None:
    from websockets.asyncio.client import connect

    index = {uid: i for i, uid in enumerate(user_ids)}
    records: list[tuple[int, int, float]] = []  # (user index, sequence, receive time)
    latencies: list[float] = []  # bare mode: sender's timestamp is in the frame
    counting = False
    sockets = []
    gate = asyncio.Semaphore(50)

    async def open_one(user: int, token: str) -> Any:
        async with gate:
            ws = await connect(
                url, max_size=2**20, ping_interval=None, compression=None, open_timeout=60
            )
            if mode == "hub":
                await ws.send(json.dumps({"type": "auth", "token": token}))
                await ws.recv()
                await ws.send(json.dumps({"type": "subscribe", "events": ["session.progress"]}))
                await ws.recv()
            else:
                await ws.send(json.dumps({"user": user}))
            return ws

    async def reader(ws: Any) -> None:
        # Regexes, not json.loads: the generators share 2 cores with the server under test, so
        # they pick out only the fields they need.
        try:
            async for message in ws:
                now = time.time()
                if not counting:
                    continue
                if mode == "hub":
                    found = HUB_FIELDS.search(message)
                    if found is not None:
                        count = ITERATIONS.search(message, found.end())
                        # An event without an iteration count matches no commit: skip it (it
                        # must not end this reader, which would stop counting the connection).
                        if count is not None:
                            records.append((index[found.group(1)], int(count.group(1)), now))
                else:
                    sent = BARE_SENT.search(message)
                    if sent is not None:
                        latencies.append(now - float(sent.group(1)))
        except Exception:  # the connection ended
            pass

    sockets = await asyncio.gather(*(open_one(u, t) for u, t in clients))
    tasks = [asyncio.create_task(reader(ws)) for ws in sockets]
    connected.release()
    # go/stop are multiprocessing events (another process sets them): poll, do not block.
    await _until(go.is_set)
    counting = True
    await _until(stop.is_set)
    counting = False
    results.put({"records": records, "latencies": latencies})
    for ws in sockets:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ws.close(), 2)
    for t in tasks:
        t.cancel()


async def _until(flag: Any) -> None:
    while not flag():  # noqa: ASYNC110 - a flag set by another process
        await asyncio.sleep(0.01)


# --- the bare websockets.broadcast baseline ------------------------------------------------
def bare_server_main(
    port: int, rate: float, users: int, frame_size: int, ready: Any, go: Any, stop: Any
) -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    asyncio.run(_bare_server(port, rate, users, frame_size, ready, go, stop))


async def _bare_server(
    port: int, rate: float, users: int, frame_size: int, ready: Any, go: Any, stop: Any
) -> None:
    from websockets.asyncio.server import broadcast, serve

    groups: dict[int, set[Any]] = {u: set() for u in range(users)}

    async def handler(ws: Any) -> None:
        user = json.loads(await ws.recv())["user"]
        groups[user].add(ws)
        try:
            await ws.wait_closed()
        finally:
            groups[user].discard(ws)

    async with serve(
        handler, "127.0.0.1", port, compression=None, ping_interval=None, max_size=2**16
    ):
        ready.set()
        await _until(go.is_set)
        pad = "x" * max(0, frame_size - 60)
        seq = 0
        interval = 1.0 / rate
        next_at = time.perf_counter()
        while not stop.is_set():
            next_at += interval
            delay = next_at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            user = seq % users
            seq += 1
            broadcast(groups[user], json.dumps({"t": time.time(), "u": user, "n": seq, "p": pad}))


# --- orchestration -------------------------------------------------------------------------
async def setup(dsn: str, users: int, subscribers: int) -> tuple[list[str], list[tuple[int, str]]]:
    settings = Settings(
        database_url=dsn,
        argon2_time_cost=1,
        argon2_memory_kib=1024,
        argon2_parallelism=1,
        pool_max_size=8,
    )
    db = await KeenDatabase.connect(settings=settings, migrate=False)
    try:
        user_ids: list[str] = []
        for u in range(users):
            user = await db.users.create(
                email=f"bench{u}@example.com", username=f"bench_{u}", password="bench password 1"
            )
            await db.sessions.create_session(
                user.id,
                session_handle=f"bench-{u}",
                vision="bench",
                working_directory="/bench",
                git_branch="main",
            )
            user_ids.append(str(user.id))
        gate = asyncio.Semaphore(8)

        async def issue(i: int) -> tuple[int, str]:
            async with gate:
                issued = await db.tokens.issue(user_ids[i % users], "session", scopes=["stream"])
            return i % users, issued.token.get_secret_value()

        clients = list(await asyncio.gather(*(issue(i) for i in range(subscribers))))
    finally:
        await db.close()
    return user_ids, clients


async def writer(
    dsn: str,
    user_ids: list[str],
    rate: float,
    seconds: float,
    commits: dict[tuple[int, int], float],
    writers: int,
    started: Any,
    mode: str = "call",
) -> tuple[int, float]:
    settings = Settings(database_url=dsn, pool_max_size=writers, pool_min_size=writers)
    db = await KeenDatabase.connect(settings=settings, migrate=False)
    gate = asyncio.Semaphore(writers)
    tasks: list[asyncio.Task[None]] = []

    async def one(u: int) -> None:
        async with gate:
            if mode == "call":  # the DAL's path: one statement, committed on the server
                session = await db.sessions.update_progress(user_ids[u], f"bench-{u}", iterations=1)
                count = session.iteration_count
            else:  # the same function inside BEGIN ... COMMIT: the xid waits on this client
                async with db.user_transaction(user_ids[u]) as conn:
                    row = await conn.fetchrow(
                        SESSION_SQL["progress"],
                        user_ids[u],
                        f"bench-{u}",
                        None,
                        1,
                        0,
                        0,
                        0,
                        [],
                        [],
                        [],
                    )
                count = row["iteration_count"]
            commits[(u, count)] = time.time()

    try:
        # Warm-up: every pooled connection prepares its statements before the clock starts.
        await asyncio.gather(
            *(one(n % len(user_ids)) for n in range(2 * writers)), return_exceptions=False
        )
        commits.clear()
        started()
        # The generators poll the go flag every 10 ms: let them start counting first.
        await asyncio.sleep(0.05)
        interval = 1.0 / rate
        start = time.perf_counter()
        next_at = start
        n = 0
        while time.perf_counter() - start < seconds:
            next_at += interval
            delay = next_at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(n % len(user_ids))))
            n += 1
        await asyncio.gather(*tasks)
        achieved = n / (time.perf_counter() - start)
    finally:
        await db.close()
    return n, achieved


def start_generators(
    mode: str, url: str, clients: list[tuple[int, str]], user_ids: list[str], procs: int
) -> tuple[list[Any], Any, Any, Any, Any]:
    ctx = mp.get_context("spawn")
    connected, go, stop, results = ctx.Semaphore(0), ctx.Event(), ctx.Event(), ctx.Queue()
    workers = []
    for p in range(procs):
        share = clients[p::procs]
        w = ctx.Process(
            target=generator_main, args=(mode, url, share, user_ids, connected, go, stop, results)
        )
        w.start()
        workers.append(w)
    for _ in range(procs):
        if not connected.acquire(timeout=600):
            raise RuntimeError("load generators did not connect")
    return workers, go, stop, results, connected


def collect(workers: list[Any], results: Any) -> list[dict[str, Any]]:
    out = [results.get(timeout=120) for _ in workers]
    for w in workers:
        w.join(timeout=30)
        if w.is_alive():
            w.kill()
    return out


def rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def cpu(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


async def run_hub(
    args: argparse.Namespace,
    dsn: str,
    user_ids: list[str],
    clients: list[tuple[int, str]],
    mode: str = "call",
) -> dict[str, Any]:
    port = free_port()
    env = {
        **os.environ,
        "KEEN_DATABASE_URL": dsn,
        "KEEN_HUB_RATE_LIMIT": "1000",
        "KEEN_POOL_MAX_SIZE": "6",
        # Every subscriber connects from 127.0.0.1, thousands at once: the socket caps are for
        # strangers, not for this measurement.
        "KEEN_HUB_MAX_CONNECTIONS": "0",
        "KEEN_HUB_MAX_CONNECTIONS_PER_ADDRESS": "0",
        "KEEN_HUB_MAX_UNAUTHENTICATED": "0",
    }
    hub = subprocess.Popen(  # noqa: ASYNC220
        # --log-level warning: a line per connection would be measured along with the fan-out.
        [
            *(sys.executable, "-m", "keen_stream", "serve"),
            *("--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"),
        ],
        env=env,
        cwd=ROOT,
    )
    try:
        await wait_port(port)
        await asyncio.sleep(1.0)
        rss_before = rss(hub.pid)
        workers, go, stop, results, _ = start_generators(
            "hub", f"ws://127.0.0.1:{port}/ws", clients, user_ids, args.procs
        )
        await asyncio.sleep(2.0)  # let connection bookkeeping settle before measuring memory
        rss_after = rss(hub.pid)
        if args.idle_only:
            stop.set()
            go.set()
            collect(workers, results)
            return {"rss_per_conn": (rss_after - rss_before) / len(clients)}
        commits: dict[tuple[int, int], float] = {}
        window: dict[str, float] = {}

        def started() -> None:
            go.set()
            window["cpu0"], window["t0"] = cpu(hub.pid), time.perf_counter()

        written, achieved = await writer(
            dsn, user_ids, args.rate, args.seconds, commits, args.writers, started, mode
        )
        cpu0, t0 = window["cpu0"], window["t0"]
        await asyncio.sleep(1.0)
        cpu1, t1 = cpu(hub.pid), time.perf_counter()
        stop.set()
        parts = collect(workers, results)
    finally:
        hub.send_signal(signal.SIGTERM)
        try:
            hub.wait(timeout=30)
        except subprocess.TimeoutExpired:
            hub.kill()
    latencies = []
    delivered = 0
    received_per_event: dict[tuple[int, int], int] = {}
    for part in parts:
        for user, seq, received in part["records"]:
            delivered += 1
            sent = commits.get((user, seq))
            if sent is not None:
                latencies.append(received - sent)
                received_per_event[(user, seq)] = received_per_event.get((user, seq), 0) + 1
    per_event = len(clients) / len(user_ids)
    # Every event written in the window, by every one of its subscribers, exactly once
    # (deliveries outside it: warm-up events that arrived after the clock started).
    subscribers = Counter(user for user, _ in clients)
    short = sum(max(0, subscribers[k[0]] - received_per_event.get(k, 0)) for k in commits)
    last_commit = max(commits.values(), default=0.0)
    for key in sorted(commits, key=commits.__getitem__):
        if received_per_event.get(key, 0) < subscribers[key[0]]:
            print(
                f"  short: event {key} (user, iteration) got {received_per_event.get(key, 0)}"
                f" deliveries; committed {1000 * (last_commit - commits[key]):.0f} ms before"
                " the last commit",
                file=sys.stderr,
            )
    extra = sum(max(0, n - subscribers[k[0]]) for k, n in received_per_event.items())
    return {
        "mode": mode,
        "missing": short,
        "duplicates": extra,
        "events": written,
        "write_rate": achieved,
        "expected": written * per_event,
        "delivered": delivered,
        "delivered_per_s": delivered / (t1 - t0),
        "p50": percentile(latencies, 0.50) * 1000,
        "p99": percentile(latencies, 0.99) * 1000,
        "cpu_s": cpu1 - cpu0,
        "cpu_pct": 100 * (cpu1 - cpu0) / (t1 - t0),
        "rss_per_conn": (rss_after - rss_before) / len(clients),
    }


async def run_bare(
    args: argparse.Namespace, user_ids: list[str], clients: list[tuple[int, str]], frame_size: int
) -> dict[str, Any]:
    port = free_port()
    ctx = mp.get_context("spawn")
    ready, go, stop = ctx.Event(), ctx.Event(), ctx.Event()
    server = ctx.Process(
        target=bare_server_main, args=(port, args.rate, len(user_ids), frame_size, ready, go, stop)
    )
    server.start()
    pid = server.pid
    assert pid is not None  # set by start()
    try:
        ready.wait(60)
        await asyncio.sleep(0.5)
        rss_before = rss(pid)
        workers, ggo, gstop, results, _ = start_generators(
            "bare", f"ws://127.0.0.1:{port}/", clients, user_ids, args.procs
        )
        await asyncio.sleep(2.0)
        rss_after = rss(pid)
        ggo.set()
        await asyncio.sleep(0.2)
        cpu0, t0 = cpu(pid), time.perf_counter()
        go.set()
        await asyncio.sleep(args.seconds)
        stop.set()
        await asyncio.sleep(1.0)
        cpu1, t1 = cpu(pid), time.perf_counter()
        gstop.set()
        parts = collect(workers, results)
    finally:
        stop.set()
        server.join(timeout=10)
        if server.is_alive():
            server.kill()
    latencies = [x for p in parts for x in p["latencies"]]
    return {
        "delivered": len(latencies),
        "delivered_per_s": len(latencies) / (t1 - t0),
        "p50": percentile(latencies, 0.50) * 1000,
        "p99": percentile(latencies, 0.99) * 1000,
        "cpu_s": cpu1 - cpu0,
        "cpu_pct": 100 * (cpu1 - cpu0) / (t1 - t0),
        "rss_per_conn": (rss_after - rss_before) / len(clients),
    }


async def wait_port(port: int, within: float = 120) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            await asyncio.sleep(0.2)
    raise RuntimeError("the hub did not start")


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--dsn",
        default=os.environ.get("KEEN_TEST_DATABASE_URL", "postgresql:///postgres"),
        help="a server where we may create a scratch database",
    )
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--rate", type=float, default=500.0, help="events per second")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--procs", type=int, default=2, help="load-generator processes")
    parser.add_argument(
        "--idle-only",
        action="store_true",
        help="only connect everyone and measure hub RSS per idle connection",
    )
    parser.add_argument("--skip-bare", action="store_true")
    parser.add_argument(
        "--writes",
        default="call",
        help="comma-separated hub runs by writer mode, e.g. call,transaction,call: 'call' is "
        "the DAL's one-statement progress report; 'transaction' runs the same function inside "
        "BEGIN/COMMIT, so each transaction id waits on the writer's round trip (the A/B baseline)",
    )
    parser.add_argument("--writers", type=int, default=16, help="concurrent DAL write transactions")
    parser.add_argument(
        "--async-commit",
        action="store_true",
        help="scratch database with synchronous_commit=off: takes the disk's fsync time out of "
        "the writer's commits (the box's DAL write ceiling with fsync is below 500/s)",
    )
    args = parser.parse_args()

    name = f"keen_fanout_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    admin = await asyncpg.connect(args.dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    dsn = with_database(args.dsn, name)
    try:
        if args.async_commit:
            await admin.execute(f'ALTER DATABASE "{name}" SET synchronous_commit = off')
        await asyncio.to_thread(upgrade, dsn)
        user_ids, clients = await setup(dsn, args.users, args.subscribers)
        per_event = args.subscribers / args.users
        print(
            f"fan-out bench: {args.subscribers} subscribers over {args.procs} generator "
            f"processes, {args.users} users ({per_event:.0f} subscribers per event), "
            f"{args.rate:.0f} events/s, {args.seconds:.0f} s, {os.cpu_count()} CPUs"
            f"{', synchronous_commit=off' if args.async_commit else ''}"
        )
        modes = [m.strip() for m in args.writes.split(",") if m.strip()]
        if not modes or set(modes) - {"call", "transaction"}:
            parser.error("--writes takes call and/or transaction")
        hubs = []
        for mode in modes:
            # Each run updates 50 rows thousands of times: vacuum first, so every run starts
            # from the same table state (otherwise later runs pay the earlier runs' bloat).
            owner = await asyncpg.connect(dsn)
            try:
                await owner.execute("VACUUM (ANALYZE) agent_sessions, stream_events")
            finally:
                await owner.close()
            hubs.append(await run_hub(args, dsn, user_ids, clients, mode))
            if args.idle_only:
                rss_kb = hubs[0]["rss_per_conn"] / 1024
                print(f"hub RSS per idle connection: {rss_kb:.1f} KB")
                return 0
        bare = None if args.skip_bare else await run_bare(args, user_ids, clients, 840)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()

    print(
        f"{'':<30}{'delivered/s':>12}{'p50 ms':>9}{'p99 ms':>9}{'CPU %':>8}"
        f"{'us CPU/dlv':>11}{'dlv/CPU-s':>11}{'RSS/conn KB':>12}"
    )
    rows = [("bare websockets.broadcast", bare)]
    rows += [(f"keen hub, writes={h['mode']}", h) for h in hubs]
    for label, r in rows:
        if r is None:
            continue
        per = r["cpu_s"] / max(1, r["delivered"]) * 1e6
        cap = r["delivered"] / r["cpu_s"] if r["cpu_s"] else float("inf")
        print(
            f"{label:<30}{r['delivered_per_s']:>12,.0f}{r['p50']:>9.2f}{r['p99']:>9.2f}"
            f"{r['cpu_pct']:>8.1f}{per:>11.1f}{cap:>11,.0f}{r['rss_per_conn'] / 1024:>12.1f}"
        )
    for hub in hubs:
        print(
            f"hub, writes={hub['mode']}: {hub['events']} events written at "
            f"{hub['write_rate']:.0f}/s; {hub['delivered']:,} deliveries for "
            f"{hub['expected']:,.0f} expected; missing {hub['missing']}, "
            f"duplicated {hub['duplicates']}"
        )
        if bare is not None and hub["cpu_s"] and bare["cpu_s"]:
            ratio = (hub["delivered"] / hub["cpu_s"]) / (bare["delivered"] / bare["cpu_s"])
            print(f"  throughput ratio (deliveries per server CPU-second, hub / bare): {ratio:.2f}")
        print(
            f"  target p99 <= 10 ms at 1k subscribers and 500 events/s -> "
            f"{'met' if hub['p99'] <= 10 else 'NOT met'} ({hub['p99']:.2f} ms)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
