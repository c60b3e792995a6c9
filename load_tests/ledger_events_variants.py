"""The ledger benchmark under three ways of capturing credit events (one variant per call).

    python load_tests/ledger_events_variants.py {none,triggers,outbox,notify} [ledger_bench options]

Runs ``load_tests/ledger_bench.py`` (deduction tps vs pgbench's plain debit) after changing the
scratch database it creates:
- ``none``: the stream-capture triggers are dropped (the ledger alone);
- ``triggers``: the outbox triggers only, no hub (run with ``KEEN_EVENT_NOTIFY_INTERVAL=60`` to
  take the wake-up NOTIFYs out as well: the cost of capture alone);
- ``outbox``: keen_stream's design: the trigger appends an outbox row, the DAL sends a coalesced
  NOTIFY after commit, and a hub node (``keen-stream serve``) runs against the database, tailing
  the outbox and fanning out;
- ``notify``: the outbox trigger also calls ``pg_notify`` inside the writing transaction (the
  design the issue warns against), with the hub running too.
Compare the printed ``ratio api / plain debit`` across variants.
"""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import asyncpg

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import ledger_bench  # noqa: E402

NOTIFY_IN_TRANSACTION = """
    CREATE OR REPLACE FUNCTION keen_stream_capture_credit() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, public
    AS $$
    BEGIN
        INSERT INTO public.stream_events (user_id, session_id, root_session_id, event_type, payload)
        VALUES (NEW.user_id, NEW.session_id, NEW.session_id, 'credit.' || NEW.transaction_type,
                jsonb_build_object('transaction_id', NEW.id, 'amount', NEW.amount::text,
                                   'balance_after', NEW.balance_after::text));
        PERFORM pg_notify('keen_stream_events', NEW.id::text);
        RETURN NULL;
    END $$
"""
DROP_CAPTURE = [
    "DROP TRIGGER IF EXISTS credit_transactions_stream ON credit_transactions",
    "DROP TRIGGER IF EXISTS agent_sessions_stream_insert ON agent_sessions",
    "DROP TRIGGER IF EXISTS agent_sessions_stream_update ON agent_sessions",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_hub(dsn: str) -> subprocess.Popen[bytes]:
    port = free_port()
    hub = subprocess.Popen(
        [sys.executable, "-m", "keen_stream", "serve", "--host", "127.0.0.1", "--port", str(port)],
        env={**os.environ, "KEEN_DATABASE_URL": dsn, "KEEN_POOL_MAX_SIZE": "4"},
        cwd=HERE.parent,
    )
    atexit.register(hub.kill)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            print(f"hub running on port {port} (pid {hub.pid})")
            return hub
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("the hub did not start")


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in ("none", "triggers", "outbox", "notify"):
        print(__doc__)
        return 2
    variant = sys.argv.pop(1)
    original = ledger_bench.create_scratch

    async def create_scratch(admin_dsn: str, name: str, accounts: int, **kwargs: object) -> str:
        dsn = await original(admin_dsn, name, accounts, **kwargs)  # type: ignore[arg-type]
        conn = await asyncpg.connect(dsn)
        try:
            if variant == "none":
                for statement in DROP_CAPTURE:
                    await conn.execute(statement)
            elif variant == "notify":
                await conn.execute(NOTIFY_IN_TRANSACTION)
        finally:
            await conn.close()
        if variant in ("outbox", "notify"):
            start_hub(dsn)
        print(f"variant: {variant}")
        return dsn

    ledger_bench.create_scratch = create_scratch  # type: ignore[assignment]
    return ledger_bench.run()


if __name__ == "__main__":
    sys.exit(main())
