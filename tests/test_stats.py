"""Confidence intervals and paired tests on data whose answers are known."""
import math

import pytest

from bench.report import build_sections
from bench.stats import mean_ci, paired_test


def test_t_interval_on_known_data():
    # mean 2, s = 1, n = 3: half-width = t(0.975, 2) * 1 / sqrt(3) = 4.302653 / 1.732051
    ci = mean_ci([1.0, 2.0, 3.0])
    assert ci.mean == 2.0 and ci.n == 3
    assert ci.half_width == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert mean_ci([0.5]).half_width is None  # one seed: no spread
    assert mean_ci([None, float("nan")]) is None


def test_paired_t_test_on_known_data():
    # differences 1, 2, 3: mean 2, s 1, t = 2 / (1 / sqrt(3)) = 3.4641, df 2 -> p = 0.07418
    a = {0: 2.0, 1: 4.0, 2: 6.0, 3: 9.0}
    b = {0: 1.0, 1: 2.0, 2: 3.0}
    p = paired_test(a, b)
    assert (p.n, p.diff) == (3, 2.0)
    assert p.p == pytest.approx(0.07418, abs=1e-4) and not p.significant
    big = paired_test({s: 10.0 + s % 2 for s in range(8)}, {s: 0.0 for s in range(8)})
    assert big.significant and big.p < 1e-6
    one = paired_test({0: 0.9}, {0: 0.1})
    assert one.p is None and one.n == 1 and one.diff == pytest.approx(0.8)


def _row(defense, seed, acc, asr):
    return {"dataset": "d", "model": "m", "attack": "badnet", "attack_name": "BadNet", "attack_display": "BadNet",
            "defense": defense.lower(), "defense_name": defense, "defense_display": defense, "seed": seed,
            "acc": acc, "asr": asr, "wall_time_s": 1.0, "epoch_equivalents": 1.0}


def test_report_shows_paired_differences_and_says_when_one_seed_cannot_tell():
    rows = [_row("undefended", s, 0.9, 0.95 + 0.01 * s) for s in range(3)]
    rows += [_row("X", s, 0.85, 0.05 + 0.02 * s) for s in range(3)]
    rows += [_row("Y", 0, 0.8, 0.5)]
    [section] = build_sections(rows)
    t = next(t for t in section.tables if t.caption.startswith("Paired"))
    x = next(r for r in t.rows if r[1] == "X")
    assert x[2] == "3" and x[3].startswith("-89.0 (p=") and x[3].endswith("*")
    y = next(r for r in t.rows if r[1] == "Y")
    assert y[3] == "-45.0 (one seed: cannot tell)"


def test_der_and_rir_on_known_values_and_the_leaderboard_lookup():
    from bench.core.metrics import der, rir
    from bench.report import leaderboard

    # FT-SAM's Table 1, FT on BadNets: 91.82/93.79 -> 90.29/1.70 gives DER 95.28
    assert 100 * der(0.9182, 0.9379, 0.9029, 0.0170) == pytest.approx(95.28, abs=0.01)
    assert der(0.9, 0.9, 0.95, 0.95) == 0.5  # a rise in ACC or ASR counts as no change
    assert rir(0.9, 0.1, 0.8, 0.7) == pytest.approx((0.6 - 0.1 + 1) / 2)
    board = leaderboard()
    assert board[("cifar10", "PreActResNet-18", 0.05, "BadNet", "FT")] == (91.22, 4.49, 88.22)
