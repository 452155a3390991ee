"""The README's examples run, and CI runs exactly the README's test command."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
MANUAL = sorted((ROOT / "docs").glob("*.md"))
#: The README is the front door; the rest is the manual in docs/.
MAX_README_LINES = 300


def test_readme_python_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert blocks
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})


@pytest.mark.parametrize("page", MANUAL, ids=lambda p: p.name)
def test_manual_python_examples_run(page):
    text = page.read_text()
    for package in re.findall(r"<!-- requires: (\S+) -->", text):  # a page about an optional toolchain
        pytest.importorskip(package, reason=f"{page.name} needs {package}, which is optional")
    for code in re.findall(r"```python\n(.*?)```", text, flags=re.S):
        exec(compile(code, str(page.relative_to(ROOT)), "exec"), {"__name__": "readme"})


def test_the_readme_is_a_front_door_and_its_links_lead_somewhere():
    assert len(README.splitlines()) <= MAX_README_LINES
    for page in [ROOT / "README.md", *MANUAL]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"
    linked = set(re.findall(r"\(docs/([^)#]+)", README))
    assert linked == {p.name for p in MANUAL}, "every page of the manual is linked from the README"


def test_ci_runs_the_readme_test_command():
    commands = re.findall(r"```bash\n(.*?)\n```", README, flags=re.S)
    assert len(commands) == 2, "the README has exactly two set-up commands"
    test_command = commands[1].strip()
    assert "pytest" in test_command
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci
