"""Every matrix shipped in matrices/ validates, so a long run cannot fail on a typo."""
import pytest
from conftest import REPO

from bench.matrix import load_matrix

SHIPPED = sorted((REPO / "matrices").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_matrix_validates(path):
    m = load_matrix(path)
    assert m.cells and m.name == path.stem


def test_quick_covers_every_attack_and_defense():
    from bench.core.registry import ATTACKS, DEFENSES

    m = load_matrix(REPO / "matrices" / "quick.yaml")
    assert {c.attack.key for c in m.cells} == set(ATTACKS.names()) - {"none"}  # "none" = clean training
    assert {c.defense.key for c in m.cells} == set(DEFENSES.names())
