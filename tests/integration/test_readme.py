"""README's code runs as written: every block marked ``<!-- readme-test: KIND -->`` is run here.

Kinds: ``python`` (top-level ``await`` allowed, as in ``python -m asyncio``), ``sh`` (the
operator's commands, on a terminal that answers their password prompts) and ``python-follow``
(a script that follows the stream until stopped). They run as separate processes against a
fresh database given as ``KEEN_DATABASE_URL``; the only change made to a block is the hub's
port in ``python-follow`` (the test's hub cannot take 8765 on a shared machine).
"""

from __future__ import annotations

import asyncio
import os
import pty
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from keen_stream.dal.database import KeenDatabase
from tests.conftest import make_settings
from tests.integration.servekit import free_port, start_serve, wait_healthy

README = Path(__file__).resolve().parents[2] / "README.md"
_BLOCK = re.compile(r"<!-- readme-test: ([\w-]+) -->\n```\w*\n(.*?)\n```", re.S)
#: Top-level await, as the asyncio REPL allows it.
_RUN_WITH_AWAIT = (
    "import ast, asyncio, sys\n"
    "code = compile(sys.stdin.read(), 'README.md', 'exec', flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)\n"
    "result = eval(code, {'__name__': '__main__'})\n"
    "if asyncio.iscoroutine(result):\n"
    "    asyncio.run(result)\n"
)
PROMPT_ANSWER = "a long enough password"


def blocks(kind: str) -> list[str]:
    found = [code for k, code in _BLOCK.findall(README.read_text()) if k == kind]
    assert found, f"README has no block marked readme-test: {kind}"
    return found


def _env(dsn: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEEN_")}
    env["KEEN_DATABASE_URL"] = dsn
    return env


def test_every_marked_block_is_of_a_known_kind() -> None:
    kinds = {k for k, _ in _BLOCK.findall(README.read_text())}
    assert kinds == {"python", "sh", "python-follow"}
    assert README.read_text().count("<!-- readme-test:") == len(_BLOCK.findall(README.read_text()))


async def test_the_data_layer_snippet_runs_as_written(fresh_dsn: str) -> None:
    for code in blocks("python"):
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _RUN_WITH_AWAIT,
            env=_env(fresh_dsn),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        output = (await asyncio.wait_for(proc.communicate(code.encode()), 120))[0].decode()
        assert proc.returncode == 0, f"{code}\n---\n{output}"


def run_on_terminal(script: str, env: dict[str, str], timeout: float = 120) -> tuple[int, str]:
    """``bash -e`` running ``script`` with a terminal as stdin (answering every password prompt
    with PROMPT_ANSWER); its exit status and everything it wrote."""
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        ["bash", "-ec", script],
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        env=env,
        start_new_session=True,  # no controlling terminal: getpass reads the one on stdin
    )
    os.close(terminal)
    output = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # EIO: every writer is gone
                break
            if not chunk:
                break
            output += chunk
            if output.rstrip().endswith((b"password:", b"Password:", b"Again:")):
                os.write(controller, f"{PROMPT_ANSWER}\n".encode())
                output += b"\n"
        return proc.wait(timeout=max(1.0, deadline - time.monotonic())), output.decode()
    finally:
        os.close(controller)
        if proc.poll() is None:
            proc.kill()


async def test_the_operator_quick_start_runs_and_its_token_follows_the_stream(
    fresh_dsn: str,
) -> None:
    env = _env(fresh_dsn)
    # Cheap hashing: the commands hash three passwords (production keeps the defaults).
    env.update(KEEN_ARGON2_TIME_COST="1", KEEN_ARGON2_MEMORY_KIB="1024")
    (script,) = blocks("sh")
    code, output = await asyncio.to_thread(run_on_terminal, f'{script}\necho "TOKEN=$TOKEN"', env)
    assert code == 0, output
    match = re.search(r"^TOKEN=(ks_api_\S+)\s*$", output, re.M)
    assert match, output
    token = match.group(1)

    db = await KeenDatabase.connect(settings=make_settings(fresh_dsn), migrate=False)
    try:
        admin = await db.users.authenticate("ahiya.butman@gmail.com", PROMPT_ANSWER)
        ada = await db.users.authenticate("ada@example.com", PROMPT_ANSWER)
        assert admin.is_admin and not ada.is_admin

        port = free_port()
        hub = await start_serve(None, port, env={"KEEN_DATABASE_URL": fresh_dsn})
        (follow,) = blocks("python-follow")
        assert "127.0.0.1:8765" in follow
        follower = None
        try:
            await wait_healthy(hub, port)
            follower = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                follow.replace("127.0.0.1:8765", f"127.0.0.1:{port}"),
                env={**env, "TOKEN": token},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            assert follower.stdout is not None
            line = b""
            for attempt in range(50):  # until its subscription is in place
                await db.sessions.create_session(
                    ada.id,
                    session_handle=f"readme-{attempt}",
                    vision="try the hub",
                    working_directory="/tmp",
                    git_branch="main",
                )
                try:
                    line = await asyncio.wait_for(follower.stdout.readline(), 0.5)
                except TimeoutError:
                    continue
                break
            assert line.decode().split()[:1] == ["session.created"], line
            assert line.decode().split()[2] == "running"
        finally:
            if follower is not None and follower.returncode is None:
                follower.kill()
                await follower.wait()
            if hub.returncode is None:
                hub.send_signal(signal.SIGTERM)
            await asyncio.wait_for(hub.communicate(), 60)
    finally:
        await db.close()


@pytest.mark.parametrize(
    "command",
    ["pip install . && keen-stream serve", "pip install -e '.[dev]' && python -m pytest --cov"],
)
def test_the_fresh_machine_commands_are_still_the_ones_in_readme(command: str) -> None:
    # They are run for real elsewhere: serve by test_serve.py, the tests by .ci/run.
    assert f"\n{command}\n" in README.read_text()
