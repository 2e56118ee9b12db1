"""The README tells the truth: its configuration table is the one the server generates, and
its two commands are the Makefile's, doing what it says they do and what CI runs.

The commands are checked with ``make -n`` (a dry run: make prints the recipes it would run,
with every variable expanded, and runs none), so a renamed target, a changed listen address
or a check dropped from ``make test`` fails here.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from imageshare_server.config import build_parser, config_table

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def two_commands() -> list[str]:
    """The commands of the README's "Two commands" block, without their comments."""
    text = README.read_text()
    section = text.split("\n## Two commands\n", 1)[1]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.strip()]


def dry_run(target: str) -> list[str]:
    """The recipe lines ``make <target>`` would run, as make itself expands them."""
    env = {k: v for k, v in os.environ.items() if k not in {"MAKEFLAGS", "MFLAGS", "MAKELEVEL"}}
    done = subprocess.run(
        ["make", "--dry-run", "--no-print-directory", "-C", str(ROOT), target],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_readme_configuration_table_is_current() -> None:
    text = README.read_text()
    start = text.index("<!-- config-table:start -->\n") + len("<!-- config-table:start -->\n")
    end = text.index("<!-- config-table:end -->")
    assert text[start:end] == config_table(), "run make readme"


def test_the_two_commands_are_make_run_and_make_test() -> None:
    assert two_commands() == ["make run", "make test"]


def test_ci_runs_the_documented_test_command() -> None:
    """CI runs exactly the README's test command, and nothing else of make."""
    lines = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert [line for line in lines if "make" in line.split()] == ["make test"]
    assert lines[-1] == "make test"  # `set -e` before it: its status is CI's status
    assert "make test" in two_commands()


def test_make_run_serves_the_address_the_readme_sends_callers_to() -> None:
    """`make run` starts the server on the embedded emulator, where the README's examples
    (`imageshare list --target ...`) point."""
    (command,) = [line for line in dry_run("run") if "imageshare-server" in line]
    argv = command.split()
    assert argv[0].endswith("/imageshare-server")
    assert "--emulator" in argv
    listen = argv[argv.index("--listen") + 1]
    targets = set(re.findall(r"--target (\S+)", README.read_text()))
    assert targets == {listen}


def test_make_test_runs_lint_types_generated_code_check_and_the_suite() -> None:
    recipe = "\n".join(dry_run("test"))
    for step in (
        "ruff check .",  # lint
        "ruff format --check .",
        "/mypy",  # types (strict, from pyproject.toml)
        "scripts/gen_protos.sh",  # generated code regenerated ...
        "diff -r $tmp/imageshare clients/python/imageshare",  # ... and compared
        "coverage run -m pytest",  # every test, with coverage
        "coverage report",  # the coverage gate (fail_under in pyproject.toml)
    ):
        assert step in recipe, step


def test_every_flag_is_documented_in_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert "--upstream-max-attempts" in text
    assert "IMAGESHARE_UPSTREAM_MAX_ATTEMPTS" in text
