"""Real PostgreSQL for every test.

The server is ``KEEN_TEST_DATABASE_URL`` (a DSN to any database on a server where we may create
databases, e.g. ``postgresql:///postgres``) or, when unset, the embedded PostgreSQL in
``.keen/test-pgdata``. The schema is migrated once into a template database; each test that asks
for ``db`` gets a fresh ``CREATE DATABASE ... TEMPLATE`` copy (about 0.1 s) and drops it after.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import itertools
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar, Unpack
from urllib.parse import urlsplit

import asyncpg
import pytest

from keen_stream.dal.database import KeenDatabase, init_connection
from keen_stream.dal.models import User
from keen_stream.dal.models.users import UserCreateFields
from keen_stream.dal.users import upsert_super_admin
from keen_stream.embedded import EmbeddedPostgres
from keen_stream.migrate import MIGRATIONS_DIR, upgrade_async
from keen_stream.settings import Settings, with_database
from tests.pgcluster import OwnedPostgres, owned_postgres_available

ROOT = Path(__file__).resolve().parent.parent
ADMIN_EMAIL = "ahiya.butman@gmail.com"
PASSWORD = "correct horse battery staple"
_counter = itertools.count()


def make_settings(dsn: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "database_url": dsn,
        "pool_min_size": 1,
        "pool_max_size": 10,
        # Cheap argon2 parameters: tests create many users; production keeps the defaults.
        "argon2_time_cost": 1,
        "argon2_memory_kib": 1024,
        "argon2_parallelism": 1,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


T = TypeVar("T")


async def statements_sent(
    dsn: str, action: Callable[[KeenDatabase], Awaitable[T]]
) -> tuple[list[str], T]:
    """The statements the DAL sends while ``action`` runs on a one-connection pool, in order."""
    single = await KeenDatabase.connect(
        settings=make_settings(dsn, pool_min_size=1, pool_max_size=1), migrate=False
    )
    try:
        sent: list[str] = []
        async with single.pool.acquire() as conn:
            conn.add_query_logger(lambda record: sent.append(record.query))
        await asyncio.sleep(0)
        sent.clear()  # the reset of that borrow itself (code borrowing the pool directly)
        result = await action(single)
        await asyncio.sleep(0)  # query loggers are called soon after the query, not inside it
        return sent, result
    finally:
        await single.close()


@functools.cache
def _database_grants() -> list[str]:
    """Migration 0007's database-level grants, from the migration itself."""
    path = MIGRATIONS_DIR / "versions" / "0007_guarantees.py"
    spec = importlib.util.spec_from_file_location("keen_migration_0007", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.DATABASE_GRANTS)


async def copy_template(admin_dsn: str, name: str, template: str) -> None:
    """Database ``name``, a copy of the migrated ``template``.

    Database-level grants are not copied from a template: a copy has PUBLIC's TEMP back, and
    the DAL refuses to start on it, so the migration's grants are applied to the copy.
    """
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    finally:
        await admin.close()
    copy = await asyncpg.connect(with_database(admin_dsn, name))
    try:
        for statement in _database_grants():
            await copy.execute(statement)
    finally:
        await copy.close()


@pytest.fixture(scope="session")
def pg_admin_dsn() -> Iterator[str]:
    configured = os.environ.get("KEEN_TEST_DATABASE_URL")
    if configured:
        yield configured
        return
    embedded = EmbeddedPostgres(ROOT / ".keen" / "test-pgdata", "postgres")
    try:
        yield embedded.admin_dsn()
    finally:
        embedded.stop()


@pytest.fixture(scope="session")
async def template_dsn(pg_admin_dsn: str) -> AsyncIterator[str]:
    name = f"keen_tpl_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    conn = await asyncpg.connect(pg_admin_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
        dsn = with_database(pg_admin_dsn, name)
        await upgrade_async(dsn)
        yield dsn
    finally:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.close()


@pytest.fixture
async def fresh_dsn(pg_admin_dsn: str, template_dsn: str) -> AsyncIterator[str]:
    """A new database copied from the migrated template, dropped after the test."""
    template = urlsplit(template_dsn).path.lstrip("/")
    name = f"keen_t_{os.getpid()}_{next(_counter)}"
    conn = await asyncpg.connect(pg_admin_dsn)
    try:
        await copy_template(pg_admin_dsn, name, template)
        yield with_database(pg_admin_dsn, name)
    finally:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.close()


@pytest.fixture
async def empty_dsn(pg_admin_dsn: str) -> AsyncIterator[str]:
    """A new database with nothing in it (for migrations from scratch), dropped afterwards."""
    name = f"keen_empty_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    conn = await asyncpg.connect(pg_admin_dsn)
    await conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield with_database(pg_admin_dsn, name)
    finally:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.close()


@pytest.fixture
def owned_pg() -> Iterator[OwnedPostgres]:
    """A private PostgreSQL server (started) that the test may stop, restart or crash."""
    if not owned_postgres_available():
        pytest.skip("needs PostgreSQL server binaries to start a private server")
    cluster = OwnedPostgres.create()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture
async def owned_dsn(owned_pg: OwnedPostgres) -> str:
    """A migrated database ``keen`` on the private server."""
    conn = await asyncpg.connect(owned_pg.dsn("postgres"))
    try:
        await conn.execute("CREATE DATABASE keen")
    finally:
        await conn.close()
    dsn = owned_pg.dsn("keen")
    await upgrade_async(dsn)
    return dsn


@pytest.fixture
def settings(fresh_dsn: str) -> Settings:
    return make_settings(fresh_dsn)


@pytest.fixture
async def db(settings: Settings) -> AsyncIterator[KeenDatabase]:
    database = await KeenDatabase.connect(settings=settings, migrate=False)
    try:
        yield database
    finally:
        await database.close()


@pytest.fixture
async def owner_conn(fresh_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain connection as the (superuser) owner: for arranging and inspecting rows."""
    conn = await asyncpg.connect(fresh_dsn)
    await init_connection(conn)  # the DAL's json codecs
    try:
        yield conn
    finally:
        await conn.close()


UserFactory = Callable[..., Awaitable[User]]


@pytest.fixture
def make_user(db: KeenDatabase) -> UserFactory:
    async def make(**fields: Unpack[UserCreateFields]) -> User:
        n = next(_counter)
        values: UserCreateFields = {
            "email": f"user{n}@example.com",
            "username": f"user_{n}",
            "password": PASSWORD,
        }
        values.update(fields)
        return await db.users.create(**values)

    return make


@pytest.fixture
async def alice(make_user: UserFactory) -> User:
    return await make_user(email="alice@example.com", username="alice")


@pytest.fixture
async def bob(make_user: UserFactory) -> User:
    return await make_user(email="bob@example.com", username="bob")


@pytest.fixture
async def admin(db: KeenDatabase) -> User:
    return await upsert_super_admin(db, ADMIN_EMAIL, PASSWORD)
