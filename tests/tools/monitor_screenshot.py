"""Write docs/monitor.png: the monitor during a recursive run, in the machine's chromium.

    KEEN_TEST_DATABASE_URL=postgresql://127.0.0.1:5432/postgres \\
        python -m tests.tools.monitor_screenshot [path]

It runs the browser test of a recursive run (tests/integration/test_monitor_browser.py: a real
hub and PostgreSQL, writes through the DAL) with KEEN_MONITOR_SCREENSHOT set, so the picture is
of what that test asserts.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

TEST = (
    "tests/integration/test_monitor_browser.py"
    "::test_a_recursive_run_shows_live_as_a_tree_and_never_another_users"
)


def main(argv: list[str]) -> int:
    target = Path(argv[0] if argv else "docs/monitor.png").resolve()
    os.environ["KEEN_MONITOR_SCREENSHOT"] = str(target)
    os.environ["KEEN_REQUIRE_BROWSER"] = "1"
    code = int(pytest.main(["-q", "-p", "no:cacheprovider", "--no-cov", TEST]))
    if code == 0:
        print(f"wrote {target} ({target.stat().st_size // 1024} KiB)")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
