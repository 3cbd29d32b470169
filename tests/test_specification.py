"""The specification the docstrings cite lives in the repository: book/specification.md.

Every "Specification §N" in the package, the exercises, the tools and the notebooks names a
section that exists there (a MyST label ``(spec-N)=``, dots written as dashes), and nothing
cites a specification outside the repository.
"""

from __future__ import annotations

import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SPEC = REPO_ROOT / "book" / "specification.md"
CITATION = re.compile(r"Specification §(\d+(?:\.\d+)?)(?:\s*[-–]\s*§(\d+(?:\.\d+)?))?")
SOURCES = [
    *(REPO_ROOT / "minimem").rglob("*.py"),
    *(REPO_ROOT / "minimem_tools").rglob("*.py"),
    *(REPO_ROOT / "exercises").rglob("*.py"),
    *(REPO_ROOT / "tools").rglob("*.py"),
    *(REPO_ROOT / "notebooks").glob("*.ipynb"),
]


def labels() -> set[str]:
    return set(re.findall(r"^\(spec-([\d-]+)\)=$", SPEC.read_text(encoding="utf-8"), flags=re.M))


def citations() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for path in SOURCES:
        for match in CITATION.finditer(path.read_text(encoding="utf-8")):
            for section in filter(None, match.groups()):
                found.setdefault(section, []).append(str(path.relative_to(REPO_ROOT)))
    return found


def test_the_specification_is_in_the_book():
    toc = (REPO_ROOT / "book" / "_toc.yml").read_text(encoding="utf-8")
    assert "file: book/specification" in toc
    assert {"1", "2", "3", "4", "4-4", "5", "6"} <= labels()


def test_every_cited_section_exists():
    found = citations()
    assert len(found) >= 5, f"expected the docstrings to cite the specification, found {sorted(found)}"
    missing = {section: files for section, files in found.items() if section.replace(".", "-") not in labels()}
    assert not missing, f"cited sections missing from book/specification.md: {missing}"


def test_nothing_cites_a_specification_outside_the_repository():
    stale = [
        str(p.relative_to(REPO_ROOT))
        for p in SOURCES
        if re.search(r"SPEC §|shared/SPEC", p.read_text(encoding="utf-8"))
    ]
    assert not stale, f"these files cite SPEC §, which is not in the repository: {stale}"
