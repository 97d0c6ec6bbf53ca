import math

import pytest
import torch

from attacks.badnet import BadNet
from bench.core import metrics
from bench.core.data import ImageSet


def _set(n=200, size=16, k=10):
    g = torch.Generator().manual_seed(1)
    return ImageSet(torch.randint(0, 200, (n, 1, size, size), generator=g, dtype=torch.uint8), torch.arange(n) % k)


def test_badnet_counts_labels_and_pixels():
    data = _set()
    p = BadNet(poison_ratio=0.05, target=1).poison(data, seed=0)
    assert int(p.is_poison.sum()) == int(200 * 0.05) and not p.is_cover.any()
    assert bool((p.train.y[p.is_poison] == 1).all())
    assert torch.equal(p.train.y[~p.is_poison], data.y[~p.is_poison])
    assert torch.equal(p.y_orig, data.y)
    diff = (p.train.x != data.x).any(dim=1)  # N x H x W
    assert not diff[~p.is_poison].any()
    side = 2  # round(3 * 16 / 32)
    outside = diff[p.is_poison].clone()
    outside[:, -side:, -side:] = False
    assert not outside.any()
    assert bool((p.train.x[p.is_poison][:, :, -side:, -side:] == 255).all())


def test_badnet_seeded_selection():
    data = _set()
    a = BadNet().poison(data, seed=0).poison_idx
    assert torch.equal(a, BadNet().poison(data, seed=0).poison_idx)
    assert not torch.equal(a, BadNet().poison(data, seed=1).poison_idx)


def test_badnet_scales_with_resolution():
    for size, side in [(32, 3), (64, 6), (224, 21)]:
        _, mask = BadNet().trigger(3, size)
        assert int(mask.sum()) == side * side and mask[-1, -1] == 1


def test_test_set_excludes_target_class():
    data = _set()
    t = BadNet(target=1).test_set(data)
    assert torch.equal(t.counts, data.y != 1)
    assert torch.equal(t.x[~t.counts], data.x[~t.counts])


def test_metric_definitions():
    y = torch.tensor([0, 1, 2, 3])
    counts = y != 1
    pred_t = torch.tensor([1, 1, 2, 1])
    assert metrics.attack_success_rate(pred_t, counts, 1) == pytest.approx(2 / 3)
    assert metrics.robust_accuracy(pred_t, y, counts) == pytest.approx(1 / 3)
    assert metrics.accuracy(torch.tensor([0, 1, 0, 0]), y) == 0.5
    assert math.isnan(metrics.attack_success_rate(pred_t, torch.zeros(4, dtype=torch.bool), 1))
    is_p = torch.tensor([True, True, False, False, False])
    d = metrics.detection(torch.tensor([0, 2]), is_p)
    assert d == {"tpr": 0.5, "fpr": pytest.approx(1 / 3), "precision": 0.5, "flagged": 2}
