"""The trigger gallery renders a PNG with a row per attack."""
from PIL import Image

from bench.cli import main
from bench.core.registry import ATTACKS


def test_gallery_png(tmp_path):
    out = tmp_path / "g.png"
    assert main(["gallery", "--dataset", "digits", "--out", str(out), "--examples", "1"]) == 0
    with Image.open(out) as im:
        w, h = im.size
    assert w > 200 and h > 60 * len(ATTACKS.names())


def test_report_gallery_uses_the_matrixs_attack_parameters(tmp_path):
    from conftest import matrix_dict

    from bench.matrix import parse_matrix
    from bench.report import gallery_attacks

    m = parse_matrix(matrix_dict(seeds=[0, 1], defenses=["undefended", "clp"],
                                 attacks=[{"name": "tact", "target": 3, "source": 2, "cover_classes": [4]},
                                          {"name": "badnet", "patch_size": 5}]))
    attacks = gallery_attacks(m, "digits")
    assert [(a.key, a.target) for a, _ in attacks] == [("tact", 3), ("badnet", 1)]  # once each, not per cell
    assert attacks[0][0].source == 2 and attacks[1][0].patch_size == 5
    assert attacks[1][1] == "BadNet(patch_size=5)"
    from bench.report import galleries

    [(caption, path)] = galleries(["digits"], None, tmp_path, m)
    assert caption == "Trigger gallery, digits (the matrix's attack parameters)"
    with Image.open(path) as im:
        two_rows = im.size[1]
    [(_, path)] = galleries(["digits"], None, tmp_path / "d")
    with Image.open(path) as im:
        assert im.size[1] > 3 * two_rows  # the default gallery has a row per registered attack
