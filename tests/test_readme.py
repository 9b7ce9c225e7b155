"""README.md stays short, its links resolve, and every `fedhosp` command it shows is one the CLI accepts."""

import re
import shlex
from pathlib import Path

import pytest

from fedhosp.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))


def _bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def _commands(text: str) -> list[list[str]]:
    """Each `fedhosp ...` line of the bash blocks, continuations joined, comments dropped, and an option
    shown as `[--flag VALUE]` or `a|b` taken as written (with its first alternative)."""
    commands = []
    for block in _bash_blocks(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if not re.match(r"(\S*/)?fedhosp\s", line):
                continue
            words = shlex.split(line.replace("[", " ").replace("]", " ").replace("$", ""))
            commands.append([w.split("|", 1)[0] for w in words[1:]])
    return commands


def test_readme_is_at_most_200_lines():
    assert len(README.read_text().splitlines()) <= 200


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.name)
def test_every_relative_link_names_a_file_that_exists(page):
    for target in re.findall(r"\]\(([^)#]+)\)", page.read_text()):
        if not target.startswith(("http://", "https://")):
            assert (page.parent / target).exists(), f"{page.name} links to {target}"


def test_the_readme_shows_every_users_command():
    shown = {c[0] for c in _commands(README.read_text())}
    assert shown >= {"simulate", "inspect", "client", "predict", "server", "certs"}


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.name)
def test_every_fedhosp_command_a_page_shows_parses(page):
    commands = _commands(page.read_text())
    parser = build_parser()
    for args in commands:
        try:
            parser.parse_args(args)
        except SystemExit as exc:
            raise AssertionError(f"README shows a command fedhosp refuses: fedhosp {shlex.join(args)}") from exc
