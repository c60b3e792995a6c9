"""What the command-line modules share: running one command's database work, printing results.

Exit codes (docs/operations.md, "Exit codes"): 0 ok; 1 a check found a problem (``ledger
verify``); 2 a usage error or a :class:`~keen_stream.errors.KeenError` (one line on stderr); 3
the record named on the command line does not exist (:class:`~keen_stream.errors.NotFound`).
"""

from __future__ import annotations

import asyncio
import getpass
import json
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

from keen_stream.errors import KeenError
from keen_stream.settings import Settings

if TYPE_CHECKING:
    from keen_stream.dal.database import KeenDatabase

EXIT_OK = 0
EXIT_PROBLEM = 1
EXIT_ERROR = 2
EXIT_NOT_FOUND = 3

T = TypeVar("T")


def run_with_database(
    settings: Settings,
    action: Callable[[KeenDatabase], Awaitable[T]],
    *,
    migrate: bool | None = None,
) -> T:
    """Connect, run ``action``, close: one command's whole life, in its own event loop.
    ``migrate``: as :meth:`KeenDatabase.connect`'s."""
    from keen_stream.dal.database import KeenDatabase

    async def run() -> T:
        db = await KeenDatabase.connect(settings=settings, migrate=migrate)
        try:
            return await action(db)
        finally:
            await db.close()

    return asyncio.run(run())


@contextmanager
def database_dsn(settings: Settings) -> Iterator[str]:
    """The configured DSN, or the embedded server's: started now, stopped when the block ends
    (for tools that connect by DSN rather than through the DAL: migrations, pg_dump)."""
    if settings.database_url:
        yield settings.database_url
        return
    from keen_stream.embedded import EmbeddedPostgres

    embedded = EmbeddedPostgres(settings.embedded_dir, settings.embedded_database)
    dsn = embedded.start()
    try:
        yield dsn
    finally:
        embedded.stop()


def print_json(value: Any) -> None:
    """``value`` as one JSON document on stdout (``--json``); Decimals, UUIDs, times as strings."""
    print(json.dumps(value, indent=2, default=str))


def shown(value: object) -> str:
    """``value`` for a terminal: ``-`` for None; characters that are not printable (newlines,
    escape sequences, bidi overrides: in text users chose, such as a token's name) escaped as
    Python writes them, so they cannot forge rows, move the cursor or retitle the terminal."""
    if value is None:
        return "-"
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in str(value))


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Left-aligned columns for people (values :func:`shown`)."""
    cells = [[shown(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    for line in [list(headers), *cells]:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())


def prompt_password(label: str, *, otherwise: str) -> str:
    """A password typed twice on the terminal; ``otherwise`` says what to do without one."""
    if not sys.stdin.isatty():
        raise KeenError(f"no terminal to ask for the password on: {otherwise}")
    try:
        first = getpass.getpass(f"{label}: ")
        again = getpass.getpass("Again: ")
    except EOFError:  # Ctrl-D at the prompt
        raise KeenError("no password given (end of input)") from None
    if first != again:
        raise KeenError("passwords do not match")
    return first
