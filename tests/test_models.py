import pytest
import torch

from bench.core.models import MODELS, build_model


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("channels,size", [(1, 16), (3, 32)])
def test_forward_and_features(name, channels, size):
    torch.manual_seed(0)
    m = build_model(name, channels, 7, [0.5] * channels, [0.25] * channels, size).eval()
    x = torch.rand(2, channels, size, size)
    out = m(x)
    assert out.shape == (2, 7)
    f = m.features(x)
    assert f.shape == (2, m.feature_dim)
    assert torch.allclose(m.head(f), out, atol=1e-5)
    assert m.feature_map(x).shape[1] == m.feature_dim


def test_normalisation_inside_model():
    m = build_model("tiny_cnn", 1, 10, [0.5], [0.25], 16)
    x = torch.full((1, 1, 16, 16), 0.5)
    assert torch.allclose(m.normalize(x), torch.zeros_like(x))


def test_large_inputs_use_imagenet_stem():
    m = build_model("resnet18", 3, 10, [0.5] * 3, [0.25] * 3, 224).eval()
    assert m.feature_map(torch.rand(1, 3, 224, 224)).shape[-1] == 7
