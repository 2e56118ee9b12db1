"""clients/README.md shows the Go and Java programs the test suite runs, not other code.

Every line of each of its Go and Java snippets (several per language: calling, error
details, check and watch) is a line of clients/go/main.go or
clients/java/ImageShareCaller.java (tests/test_polyglot_callers.py compiles and runs
those), and the Java runtime classpath it lists is the one clients/java/build.sh uses.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "clients" / "README.md"
PROGRAMS = {
    "go": ROOT / "clients" / "go" / "main.go",
    "java": ROOT / "clients" / "java" / "ImageShareCaller.java",
}


@pytest.mark.parametrize("language", sorted(PROGRAMS))
def test_snippets_are_excerpts_of_the_tested_program(language: str) -> None:
    blocks = re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), re.M | re.S)
    assert blocks, f"no {language} snippet"
    program = {line.strip() for line in PROGRAMS[language].read_text().splitlines()}
    excerpted = 0
    for number, block in enumerate(blocks, 1):
        lines = [line.strip() for line in block.splitlines() if line.strip()]
        assert lines, f"{language} snippet {number} is empty"
        missing = [line for line in lines if line not in program]
        assert not missing, (
            f"{language} snippet {number}, not in {PROGRAMS[language].name}: {missing}"
        )
        excerpted += len(lines)
    assert excerpted > 20


def test_readme_lists_the_java_runtime_classpath_the_build_uses() -> None:
    text = README.read_text()
    listed = re.search(r"whole runtime classpath.*?\n```\n(.*?)```", text, re.S)
    assert listed is not None
    documented = listed[1].split("(each")[0].split()
    script = (ROOT / "clients" / "java" / "build.sh").read_text()
    used = re.search(r"for jar in (.*?); do", script, re.S)
    assert used is not None
    assert documented == used[1].replace("\\", " ").split()
    assert {"perfmark-api", "grpc-netty", "proto-google-common-protos"} <= set(documented)
