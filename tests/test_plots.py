"""Figures: distinct styles for any number of entries, PNG and PDF, sweeps with error bars."""
import pytest

from bench.plots import make_figures, style


@pytest.mark.parametrize("n", [3, 10, 12, 25])
def test_every_entry_has_its_own_colour_and_marker(n):
    styles = [style(i, n) for i in range(n)]
    assert len({(tuple(s["color"]), s["marker"]) for s in styles}) == n
    if n <= 20:  # colours alone stay distinct up to 20 entries
        assert len({tuple(s["color"]) for s in styles}) == n
    if n > 10:  # the dark and light shade of one hue (entries i and i + 10) differ in marker too
        assert all(styles[i]["marker"] != styles[i + 10]["marker"] for i in range(n - 10))


def _row(defense, seed, ratio, asr):
    return {"dataset": "digits", "model": "tiny_cnn", "attack": "badnet", "attack_name": f"BadNet({ratio})",
            "defense": defense.lower(), "defense_name": defense, "seed": seed, "acc": 0.9, "asr": asr,
            "attack_params": {"poison_ratio": ratio}, "defense_params": {},
            "detection": {"tpr": 0.5, "fpr": 0.1, "precision": 0.5, "flagged": 3}}


def test_figures_are_written_as_png_and_pdf(tmp_path):
    rows = [_row(f"D{i}", s, r, 0.1 * i + 0.01 * s) for i in range(12) for s in (0, 1) for r in (0.05, 0.1)]
    figs = make_figures(rows, tmp_path)
    names = {p.name for _, p in figs}
    assert {"scatter_digits_tiny_cnn.png", "poison_ratio_digits_tiny_cnn.png", "detection_digits.png"} <= names
    for _, p in figs:
        assert p.exists() and p.with_suffix(".pdf").read_bytes().startswith(b"%PDF")
    # a second call empties the folder of figures first (no stale files)
    (tmp_path / "stale.pdf").write_bytes(b"%PDF")
    make_figures(rows, tmp_path)
    assert not (tmp_path / "stale.pdf").exists()
