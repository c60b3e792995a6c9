"""Helpers for ``.ci/package_check``, run with the fresh virtualenv's python (the installed wheel),
from a directory outside the checkout. Standard library, asyncpg and keen_stream only.

    package_smoke.py create-db ADMIN_DSN     print the DSN of a new scratch database; exit 1 when
                                             the server is not reachable
    package_smoke.py drop-db ADMIN_DSN DSN   drop it (forcing out any session left)
    package_smoke.py free-port               print a free TCP port on 127.0.0.1
    package_smoke.py wait-healthy URL SECS   poll URL until it answers 200 (exit 1 on timeout)
    package_smoke.py dal CHECKOUT            the data layer: connect, create a user,
                                             authenticate, close; keen_stream must not come
                                             from CHECKOUT

``dal`` uses ``KEEN_DATABASE_URL`` (already migrated by ``keen-stream migrate``) or, when it is
unset, the embedded PostgreSQL in ``KEEN_EMBEDDED_DIR``.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg

from keen_stream.settings import with_database


def create_db(admin_dsn: str) -> int:
    name = f"keen_package_{uuid.uuid4().hex[:10]}"

    async def run() -> None:
        conn = await asyncpg.connect(admin_dsn, timeout=3)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    try:
        asyncio.run(run())
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        print(f"no scratch database on {admin_dsn}: {exc}", file=sys.stderr)
        return 1
    print(with_database(admin_dsn, name))
    return 0


def drop_db(admin_dsn: str, dsn: str) -> int:
    name = urlsplit(dsn).path.lstrip("/")
    if not name.startswith("keen_package_"):
        print(f"refusing to drop {name!r}: not a scratch database", file=sys.stderr)
        return 1

    async def run() -> None:
        conn = await asyncpg.connect(admin_dsn, timeout=3)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    asyncio.run(run())
    return 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        print(sock.getsockname()[1])
    return 0


def wait_healthy(url: str, seconds: str) -> int:
    deadline = time.monotonic() + float(seconds)
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 (http only)
                if response.status == 200:
                    print(f"{url}: 200 {response.read().decode()[:200]}")
                    return 0
                last = f"HTTP {response.status}"
        except urllib.error.HTTPError as exc:  # 503 while starting
            last = f"HTTP {exc.code}"
        except OSError as exc:  # not listening yet
            last = str(exc)
        time.sleep(0.5)
    print(f"{url} not healthy within {seconds} s: {last}", file=sys.stderr)
    return 1


def dal(checkout: str) -> int:
    import keen_stream
    from keen_stream import KeenDatabase
    from keen_stream.errors import InvalidCredentials
    from keen_stream.settings import Settings

    location = Path(keen_stream.__file__).resolve()
    if location.is_relative_to(Path(checkout).resolve()):
        print(f"keen_stream was imported from the checkout ({location})", file=sys.stderr)
        return 1
    package = resources.files("keen_stream")
    for name in (
        "py.typed",
        "migrations/env.py",
        "migrations/script.py.mako",
        "hub/static/index.html",  # the browser monitor (/monitor/) and its JS client
        "hub/static/keen-client.js",
    ):
        if not package.joinpath(name).is_file():
            print(f"the installed keen_stream lacks {name}", file=sys.stderr)
            return 1

    async def run() -> None:
        # Cheap argon2 parameters: this checks the wiring, not the hash's cost.
        settings = Settings(argon2_time_cost=1, argon2_memory_kib=1024, argon2_parallelism=1)
        db = await KeenDatabase.connect(settings=settings)
        try:
            suffix = uuid.uuid4().hex[:12]
            email = f"smoke-{suffix}@example.com"
            password = secrets.token_urlsafe(16)
            user = await db.users.create(email=email, username=f"smoke_{suffix}", password=password)
            logged_in = await db.users.authenticate(email, password)
            if logged_in.id != user.id or logged_in.last_login_at is None:
                raise AssertionError(f"authenticate returned {logged_in!r} for {user!r}")
            try:
                await db.users.authenticate(email, password + "!")
            except InvalidCredentials:
                pass
            else:
                raise AssertionError("a wrong password was accepted")
            print(f"created and authenticated {user.email} with keen_stream from {location.parent}")
        finally:
            await db.close()

    asyncio.run(run())
    return 0


COMMANDS: dict[str, Callable[..., int]] = {
    "create-db": create_db,
    "drop-db": drop_db,
    "free-port": free_port,
    "wait-healthy": wait_healthy,
    "dal": dal,
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        print(__doc__, file=sys.stderr)
        return 2
    return COMMANDS[argv[0]](*argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
