"""docs/methods/ is generated from the code (python -m bench docs), and docstrings point at
repository paths only."""
import re
from pathlib import Path

from bench import methods_docs

REPO = Path(__file__).resolve().parents[1]


def test_the_method_pages_match_the_code():
    assert methods_docs.stale() == [], "run `python -m bench docs`"


def test_a_stale_missing_or_left_over_page_is_named(tmp_path):
    methods_docs.write(tmp_path)
    (tmp_path / "abl.md").write_text((tmp_path / "abl.md").read_text().replace("| 0.1 |", "| 0.2 |", 1))
    (tmp_path / "dbr.md").unlink()
    (tmp_path / "gone.md").write_text("old page\n")
    assert methods_docs.stale(tmp_path) == ["abl.md", "dbr.md", "gone.md"]


def test_every_page_names_its_paper_and_parameters():
    pages = methods_docs.pages()
    for name, text in pages.items():
        if name in ("README.md", "none.md", "undefended.md"):
            continue
        # a citation: authors ("et al."), a quoted title or a year
        assert re.search(r'et al\.|"[A-Z][^"]{15,}"|\b(19|20)\d\d\b', text), f"{name}: no paper named"
        assert "## Parameters" in text


def test_docstrings_point_only_into_the_repository():
    outside = re.compile(r"specs?/|design\.md|fidelity\.md|§|\[BB\]|\[BBox\]|shared/")
    found = []
    for top in ("bench", "attacks", "defenses", "advrbd", "evaluations"):
        for path in (REPO / top).rglob("*.py"):
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if outside.search(line):
                    found.append(f"{path.relative_to(REPO)}:{i}: {line.strip()}")
    assert found == []
