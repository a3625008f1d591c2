import pytest
import torch
import torch.nn.functional as F

from deqdiff.analysis.landscape import (filter_normalize, flatness_summary, landscape_1d, landscape_2d,
                                        random_directions)
from tests.analysis.helpers import FCNet


class ConvToy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 4, 3)
        self.norm = torch.nn.GroupNorm(2, 4)
        self.lin = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(self.norm(self.conv(x)).mean((2, 3)))


def test_filter_normalization_matches_its_definition():
    torch.manual_seed(0)
    model = ConvToy()
    (d,) = random_directions(model, 1, seed=3)
    w = dict(model.named_parameters())
    for name in ("conv.weight", "lin.weight"):
        for i in range(w[name].shape[0]):  # filter i: output channel / output neuron
            assert torch.allclose(d[name][i].norm(), w[name][i].norm(), rtol=1e-9)
    for name in ("conv.bias", "norm.weight", "norm.bias", "lin.bias"):
        assert torch.count_nonzero(d[name]) == 0  # Li et al. --xignore biasbn
    (c,) = random_directions(model, 1, seed=3, ignore="copy")
    assert torch.equal(c["norm.weight"], w["norm.weight"].detach())
    # a direction is the per-filter rescaling of the raw Gaussian draw (directions, not just norms)
    raw = {k: torch.randn_like(v) for k, v in w.items()}
    n = filter_normalize(raw, {k: v.detach() for k, v in w.items()})
    cos = F.cosine_similarity(n["conv.weight"].flatten(1), raw["conv.weight"].flatten(1))
    assert torch.allclose(cos, torch.ones_like(cos))
    with pytest.raises(ValueError, match="ignore"):
        filter_normalize(raw, w, ignore="nope")


def _data(seed=0, n=24):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_centre_equals_trained_loss_and_grid_matches_pointwise_evaluation():
    torch.manual_seed(1)
    model = FCNet(d=5, n=6, c=3, tol=1e-12)
    X, Y = _data()
    land = landscape_2d(model, F.cross_entropy, X, Y, steps=5, points_per_batch=7, samples_per_batch=10)
    with torch.no_grad():
        trained = float(F.cross_entropy(model(X), Y))
    assert land.center_loss == pytest.approx(trained, rel=1e-10)
    d1, d2 = random_directions(model, 2, seed=0)
    # one grid point by hand: move the weights in place, evaluate, restore
    a, b = float(land.alphas[1]), float(land.betas[4])
    params = dict(model.named_parameters())
    with torch.no_grad():
        saved = {k: p.clone() for k, p in params.items()}
        for k, p in params.items():
            p.add_(a * d1[k] + b * d2[k])
        by_hand = float(F.cross_entropy(model(X), Y))
        for k, p in params.items():
            p.copy_(saved[k])
    assert float(land.loss[1, 4]) == pytest.approx(by_hand, rel=1e-9)
    assert land.accuracy is not None and land.accuracy.shape == (5, 5)


def test_landscape_is_deterministic_with_a_seed():
    torch.manual_seed(2)
    model = FCNet(d=5, n=6, c=3, tol=1e-10)
    X, Y = _data(1)
    l1 = landscape_1d(model, F.cross_entropy, X, Y, steps=7, seed=5)
    l2 = landscape_1d(model, F.cross_entropy, X, Y, steps=7, seed=5)
    l3 = landscape_1d(model, F.cross_entropy, X, Y, steps=7, seed=6)
    assert torch.equal(l1.loss, l2.loss)
    assert not torch.equal(l1.loss, l3.loss)
    assert l1.loss[3] == l3.loss[3]  # same centre


def test_flatness_summary_on_known_quadratics():
    from deqdiff.analysis.landscape import Landscape

    a = torch.linspace(-1, 1, 21, dtype=torch.float64)
    A, B = torch.meshgrid(a, a, indexing="ij")
    sharp = Landscape(a, a, 4 * (A**2 + B**2), None, 0.0)
    flat = Landscape(a, a, 0.5 * (A**2 + B**2), None, 0.0)
    s, f = flatness_summary(sharp), flatness_summary(flat)
    assert s["area_below"]["0.5"] < f["area_below"]["0.5"]
    assert s["sharpness"]["0.5"] == pytest.approx(4 * 0.5, rel=1e-9)
    assert s["curvature"] == pytest.approx([8.0, 8.0], rel=1e-9)
    with pytest.raises(ValueError, match="odd"):
        landscape_1d(None, None, None, None, steps=4)
