"""Rewrite the README's configuration table from ``imageshare_server.config`` (``make readme``)."""

from __future__ import annotations

from pathlib import Path

from imageshare_server.config import config_table

START, END = "<!-- config-table:start -->\n", "<!-- config-table:end -->"

readme = Path(__file__).resolve().parents[1] / "README.md"
text = readme.read_text()
head, rest = text.split(START, 1)
_, tail = rest.split(END, 1)
readme.write_text(head + START + config_table() + END + tail)
