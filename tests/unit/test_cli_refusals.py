"""What the command line refuses before it touches a database: one line, exit 2, no traceback."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from keen_stream import cli
from keen_stream.settings import get_settings
from tests.conftest import make_settings


@pytest.fixture
def fresh_settings() -> Iterator[None]:
    """``cli.main`` reads the environment afresh (get_settings caches it)."""
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.mark.usefixtures("fresh_settings")
@pytest.mark.parametrize(
    ("variable", "value", "said"),
    [
        ("KEEN_HUB_PORT", "99999", "KEEN_HUB_PORT: Input should be less than or equal to 65535"),
        ("KEEN_CREDIT_MARKUP", "4.50", "KEEN_CREDIT_MARKUP is no longer read"),
    ],
)
def test_a_bad_setting_is_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    variable: str,
    value: str,
    said: str,
) -> None:
    monkeypatch.setenv(variable, value)
    monkeypatch.setenv("KEEN_ADMIN_PASSWORD", "never-shown-secret")
    assert cli.main(["users", "list"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("keen-stream: invalid settings: ") and err.count("\n") == 1, err
    assert said in err and value not in err.replace(said, "")


@pytest.mark.parametrize("port", ["70000", "-1"])
def test_serve_refuses_a_port_that_does_not_exist(
    capsys: pytest.CaptureFixture[str], port: str
) -> None:
    # uvicorn would bind 70000 modulo 65536 (4464): somewhere the operator did not ask for.
    with pytest.raises(SystemExit) as exit_:
        cli.main(["serve", "--port", port])
    assert exit_.value.code == 2
    assert "--port" in capsys.readouterr().err


def test_end_of_input_at_a_password_prompt_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Ctrl-D at "Password:": getpass raises EOFError, which is no KeenError.
    def eof(prompt: str = "") -> str:
        raise EOFError

    monkeypatch.setattr("sys.stdin.isatty", lambda: True)
    monkeypatch.setattr("getpass.getpass", eof)
    settings = make_settings("postgresql://127.0.0.1:1/never-reached")
    assert cli.main(["users", "create", "ada@example.com"], settings=settings) == 2
    err = capsys.readouterr().err
    assert err.startswith("keen-stream: no password") and err.count("\n") == 1, err
