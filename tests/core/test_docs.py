"""The documentation points only to what users have: its own pages and their sections."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ("bsym", "training", "export", "serving", "docs", "examples", "benchmarks", "scripts")
# a pointer to a section of the papers page: docs/papers.md, "Rotation symmetry"
SECTION = re.compile(r'papers\.md\)?,\s+"([^"]+)"')


def project_texts() -> dict[Path, str]:
    paths = [ROOT / "README.md"]
    for folder in SHIPPED:
        paths += [p for p in (ROOT / folder).rglob("*") if p.suffix in {".py", ".md", ".sh"}]
    return {path: path.read_text(encoding="utf-8") for path in paths if path.is_file()}


def test_nothing_points_outside_the_project() -> None:
    outside = ("PAPERS" + ".md", "../" + "shared")
    found = [
        f"{path.relative_to(ROOT)}: {name}"
        for path, text in project_texts().items()
        for name in outside
        if name in text
    ]
    assert found == []


def test_pointers_to_the_papers_page_name_its_sections() -> None:
    page = (ROOT / "docs" / "papers.md").read_text(encoding="utf-8")
    sections = set(re.findall(r"^## (.+)$", page, flags=re.MULTILINE))
    pointers = {
        f"{path.relative_to(ROOT)}: {' '.join(name.split())}"
        for path, text in project_texts().items()
        for name in SECTION.findall(text)
    }
    assert len(pointers) >= 8
    assert sorted(p for p in pointers if p.split(": ", 1)[1] not in sections) == []
    assert "docs/papers.md" in (ROOT / "README.md").read_text(encoding="utf-8")
