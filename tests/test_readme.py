"""The README's configuration table is the one the server generates."""

from __future__ import annotations

from pathlib import Path

import pytest

from imageshare_server.config import build_parser, config_table

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_configuration_table_is_current():
    text = README.read_text()
    start = text.index("<!-- config-table:start -->\n") + len("<!-- config-table:start -->\n")
    end = text.index("<!-- config-table:end -->")
    assert text[start:end] == config_table(), "run make readme"


def test_readme_shows_the_two_commands():
    text = README.read_text()
    assert "make run" in text
    assert "make test" in text


def test_every_flag_is_documented_in_help(capsys):
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert "--upstream-max-attempts" in text
    assert "IMAGESHARE_UPSTREAM_MAX_ATTEMPTS" in text
