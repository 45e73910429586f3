"""The README and the pages it links to: every relative link points to a file of the repository, and every
#anchor to a heading of the page it names (GitHub's rule for heading anchors), so that moving a measurement
from one page to another cannot leave a dead link behind."""
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "fast" / "README.md", *sorted((ROOT / "results").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchor(heading):
    """GitHub's anchor of a markdown heading: lower case, punctuation but hyphens dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page):
    return {anchor(line.lstrip("#")) for line in page.read_text().splitlines() if re.match(r"#{1,6} ", line)}


def test_relative_links_and_anchors_resolve():
    broken = []
    for page in PAGES:
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target):  # http(s), mailto: not checked here
                continue
            path, _, fragment = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif fragment and linked.suffix == ".md" and fragment not in anchors(linked):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_anchor_rule():
    assert anchor(" Speed and memory") == "speed-and-memory"
    assert anchor("The default run: every measurement") == "the-default-run-every-measurement"
    assert anchor("SAM ViT-B: earlier tables") == "sam-vit-b-earlier-tables"


def test_the_tree_speaks_of_the_product():
    """No file outside tests/ and .ci/ speaks of how the work was done (measurement calls, borrowed machines)
    or points outside the repository (../shared): the README and the code are read by people who have
    neither."""
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout: no list of tracked files")
    leak = re.compile(r"\bcall [a-z]{1,2}\b|lent |\.\./shared", re.IGNORECASE)
    found = []
    for name in listed.stdout.splitlines():
        if name.startswith(("tests/", ".ci/")) or not (ROOT / name).is_file():
            continue
        try:
            text = (ROOT / name).read_text()
        except UnicodeDecodeError:  # pictures
            continue
        found += [f"{name}:{i}: {line.strip()}" for i, line in enumerate(text.splitlines(), 1) if leak.search(line)]
    assert not found, "\n".join(found[:20])
