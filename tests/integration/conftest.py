"""Fixtures of the integration tests that run the embedded PostgreSQL themselves."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.servekit import kill_leftovers


@pytest.fixture
def embedded_dir() -> Iterator[Path]:
    """A new data directory for an embedded server; whatever still runs on it is stopped after.

    Not under pytest's tmp_path: as root the server runs as ``embedded_postgres``, which must
    traverse every parent directory, and each pytest session that starts (other runs on the
    machine) makes ``/tmp/pytest-of-<user>`` private again (0700): initdb then failed with
    "Permission denied" mid-test.
    """
    root = Path(tempfile.mkdtemp(prefix="keen-embedded-"))
    data = root / "pgdata"
    try:
        yield data
    finally:
        kill_leftovers(data)
        shutil.rmtree(root, ignore_errors=True)
