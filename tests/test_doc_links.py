"""The README and the pages of docs/ hold together: every relative link leads to a file
and, with a #anchor, to a heading of that file, and the README lists every alert."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# [text](target) and ![alt](target); a target has no spaces.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```$", re.MULTILINE | re.DOTALL)


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped, spaces to '-'."""
    text = heading.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The anchors of a page's headings; a repeated one gets -1, -2... as on GitHub."""
    found: set[str] = set()
    for line in FENCE.sub("", page.read_text()).splitlines():
        heading = re.match(r"^#{1,6} (.+)$", line)
        if heading is None:
            continue
        name = base = anchor(heading.group(1))
        n = 0
        while name in found:
            n += 1
            name = f"{base}-{n}"
        found.add(name)
    return found


def relative_links(page: Path) -> list[tuple[int, str]]:
    """(line, target) of each link to a file of the checkout, code blocks left out."""
    text = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), page.read_text())
    links = []
    for link in LINK.finditer(text):  # a link's text may run over two lines
        target = link.group(1)
        if not re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            links.append((text.count("\n", 0, link.start()) + 1, target))
    return links


def test_the_pattern_finds_the_links_in_use() -> None:
    targets = {t for _, t in relative_links(ROOT / "README.md")}
    assert {"docs/configuration.md", "docs/kling-budgets.png"} <= targets
    assert anchor("## Kling's callbacks".lstrip("# ")) == "klings-callbacks"
    assert anchor("5. What differs on purpose") == "5-what-differs-on-purpose"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_leads_to_a_file_and_a_heading(page: Path) -> None:
    broken = []
    for number, target in relative_links(page):
        path, _, fragment = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        where = f"{page.relative_to(ROOT)}:{number}: {target}"
        if not dest.exists():
            broken.append(f"{where}: no such file")
        elif fragment and (dest.suffix != ".md" or fragment not in anchors(dest)):
            broken.append(f"{where}: no heading #{fragment} there")
    assert not broken, "\n".join(broken)


def test_the_readme_lists_every_alert() -> None:
    rules = yaml.safe_load((ROOT / "alerts" / "kling.alerts.yml").read_text())
    alerts = {r["alert"] for group in rules["groups"] for r in group["rules"]}
    section = (ROOT / "README.md").read_text().split("\n## Alerts\n", 1)[1].split("\n## ")[0]
    listed = set(re.findall(r"`(Kling[A-Za-z]+)`", section))
    assert alerts - listed == set(), "alerts the README does not list"
    assert listed - alerts == set(), "listed in the README but not in the rules"
