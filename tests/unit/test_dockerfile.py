"""The Dockerfile refers to what exists: its COPY sources, its command, the path it probes.

No Docker needed: the file is parsed, and what it names is looked up in the repository, the
package's declared console scripts, the CLI's parser and the hub's routes.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from keen_stream.cli import build_parser
from keen_stream.hub.app import create_app
from keen_stream.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str


def instructions() -> list[Instruction]:
    """The Dockerfile's instructions: comments dropped, continuation lines joined."""
    found: list[Instruction] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, args = (pending + stripped).partition(" ")
        found.append(Instruction(keyword.upper(), args.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued instruction"
    return found


def final_stage() -> list[Instruction]:
    parsed = instructions()
    last_from = max(i for i, ins in enumerate(parsed) if ins.keyword == "FROM")
    return parsed[last_from:]


def exec_form(args: str) -> list[str]:
    """A JSON-array (exec form) argument list; the shell form is refused: signals reach PID 1
    only in the exec form."""
    assert args.startswith("["), f"use the exec form (a JSON array), not {args!r}"
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value)
    return value


def one(keyword: str) -> Instruction:
    found = [ins for ins in final_stage() if ins.keyword == keyword]
    assert len(found) == 1, f"the image has {len(found)} {keyword} instructions"
    return found[0]


def project() -> dict[str, object]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)["project"]  # type: ignore[no-any-return]


def dockerignored() -> list[str]:
    path = ROOT / ".dockerignore"
    lines = path.read_text().splitlines() if path.exists() else []
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def copy_sources() -> list[str]:
    """Every source a COPY takes from the build context (not those of ``--from=`` a stage)."""
    sources: list[str] = []
    for ins in instructions():
        if ins.keyword not in ("COPY", "ADD"):
            continue
        words = shlex.split(ins.args)
        assert ins.keyword == "COPY", "ADD fetches and unpacks: use COPY"
        if any(w.startswith("--from=") for w in words):
            continue
        paths = [w for w in words if not w.startswith("--")]
        assert len(paths) >= 2, f"COPY {ins.args}"
        sources.extend(paths[:-1])
    return sources


def test_every_copy_source_exists_and_is_not_dockerignored() -> None:
    sources = copy_sources()
    assert sources
    ignored = dockerignored()
    for source in sources:
        assert not Path(source).is_absolute() and ".." not in Path(source).parts, source
        assert (ROOT / source).exists(), f"COPY {source}: no such path in the repository"
        for pattern in ignored:
            assert not fnmatch.fnmatch(source.rstrip("/"), pattern.strip("/")), (
                f"COPY {source} is excluded by .dockerignore ({pattern})"
            )


def test_the_build_context_holds_what_the_wheel_build_reads() -> None:
    sources = {s.rstrip("/") for s in copy_sources()}
    assert "pyproject.toml" in sources
    readme = project().get("readme")
    if isinstance(readme, str):
        assert readme in sources, f"pyproject's readme {readme} is not copied"
    assert "keen_stream" in sources


def test_the_image_installs_only_the_wheel() -> None:
    parsed = instructions()
    assert sum(ins.keyword == "FROM" for ins in parsed) >= 2, "a build stage, then the image"
    runs = " ".join(ins.args for ins in final_stage() if ins.keyword == "RUN")
    assert "pip install" in runs and ".whl" in runs
    assert "-e " not in runs and "--editable" not in runs
    final_copies = [ins.args for ins in final_stage() if ins.keyword == "COPY"]
    assert final_copies and all("--from=" in args for args in final_copies), (
        "the image takes nothing from the source tree, only the built wheel"
    )
    assert one("FROM").args.split()[0] == "python:3.11-slim"


def test_the_image_runs_as_a_non_root_user() -> None:
    user = one("USER").args.split(":")[0]
    assert user not in ("root", "0")


def test_cmd_is_a_declared_console_script_with_valid_options() -> None:
    command = exec_form(one("CMD").args)
    scripts = project()["scripts"]
    assert isinstance(scripts, dict)
    assert command[0] in scripts, f"{command[0]} is not in [project.scripts] {sorted(scripts)}"
    assert scripts[command[0]] == "keen_stream.cli:main"
    args = build_parser().parse_args(command[1:])  # exits (SystemExit) on an unknown option
    assert args.command == "serve"
    assert args.host == "0.0.0.0"
    assert str(args.port) in one("EXPOSE").args.split()


def test_the_health_check_probes_a_route_the_hub_serves() -> None:
    healthcheck = one("HEALTHCHECK").args
    options, _, command = healthcheck.partition("CMD ")
    assert command, "HEALTHCHECK needs a CMD"
    assert "--start-period=" in options, "the embedded PostgreSQL's first start takes a while"
    argv = exec_form(command.strip())
    assert argv[:2] == ["python", "-c"], "the slim image has no curl: python -c"
    compile(argv[2], "<healthcheck>", "exec")
    urls = re.findall(r"https?://[^'\"\s]+", argv[2])
    assert len(urls) == 1, argv[2]
    url = urlsplit(urls[0])
    assert url.hostname in ("127.0.0.1", "localhost")
    cmd_args = build_parser().parse_args(exec_form(one("CMD").args)[1:])
    assert url.port == cmd_args.port

    app = create_app(Settings(database_url="postgresql://127.0.0.1/unused"))
    paths = {getattr(route, "path", None) for route in app.starlette.routes}
    assert url.path in paths, f"the hub serves {sorted(p for p in paths if p)}, not {url.path}"
    assert url.path == "/healthz"


@pytest.mark.parametrize("keyword", ["EXPOSE", "VOLUME"])
def test_the_image_declares(keyword: str) -> None:
    assert one(keyword).args
