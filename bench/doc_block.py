"""Generated blocks inside hand-written docs: a bench's figures between its own begin/end markers.

A page keeps its prose; only what sits between `<!-- NAME: begin -->` and `<!-- NAME: end -->` is
rewritten, so figures come from a results file and are never typed by hand.
"""

from __future__ import annotations

from pathlib import Path


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}: begin -->", f"<!-- {name}: end -->"


def replace(page: Path, name: str, body: str) -> Path:
    """Put `body` between NAME's markers in `page`; a page without them is one error naming both."""
    begin, end = markers(name)
    text = page.read_text()
    if begin not in text or end not in text:
        raise SystemExit(f"{page}: no {begin} ... {end} block to fill")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    page.write_text(f"{head}{begin}\n{body}\n{end}{tail}")
    return page
