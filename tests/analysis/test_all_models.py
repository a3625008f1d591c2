"""Every analysis tool on every model the library ships, with the models' defaults (small sizes).

Grid: 6 models (DEQ layer with a cell, MonotoneDEQ and MonotoneConvDEQ with their default
Peaceman–Rachford solve and solver options, the conv DEQ of eq. 4.1, its repeat-k, the physics PIDEQ) × 8 tools
(residual curves, trajectories, full and trace NTK, equilibrium matrix, Hessian spectrum, 1D and
2D landscapes). Results must be finite and correctly shaped; tools that need an equilibrium
refuse repeat-k by name. Value checks where cheap: the landscape at every grid point against a
direct evaluation at those parameters (the vmapped solve over parameter sets), and the NTK of
the monotone DEQs against per-sample Jacobians taken one sample and one output at a time.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from deqdiff import analysis as A
from deqdiff.models import ConvDEQ, ConvRepeat, MonotoneConvDEQ, MonotoneDEQ
from deqdiff.physics.models import PIDEQ
from tests.analysis.helpers import FCNet

S = 3  # samples
C = 3  # outputs of the classifiers


def build(name: str):
    """(model, X, Y, state width) with fixed seeds; the global RNG state is left as it was
    (later tests draw their models from it)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return _build(name)


def _build(name: str):
    img = torch.randn(S, 1, 4, 4)
    labels = torch.tensor([0, 2, 1])
    if name == "deq":
        return FCNet(d=5, n=6, c=C), torch.randn(S, 5), labels, 6
    if name == "monotone":
        return MonotoneDEQ(5, 6, C), torch.randn(S, 5), labels, 6
    if name == "monotone_conv":  # m = 0.5: PR converges in tens of iterations (m = 0.05 takes > 100)
        return MonotoneConvDEQ(1, 2, 4, C, m=0.5), img, labels, 2 * 4 * 4
    if name == "conv":
        return ConvDEQ(1, 4, C, channels=2, hidden=4, groups=2), img, labels, 2 * 4 * 4
    if name == "repeat_k":
        return ConvRepeat(1, 4, C, k=3, channels=2, hidden=4, groups=2), img, labels, 2 * 4 * 4
    if name == "pideq":
        return PIDEQ(2, 2, width=6), torch.randn(S, 2), torch.randn(S, 2), 6
    raise KeyError(name)


MODELS = ["deq", "monotone", "monotone_conv", "conv", "repeat_k", "pideq"]
NEEDS_DEQ = {"residual_curves", "trajectories", "equilibrium_matrix", "hessian"}


def loss_for(Y):
    return F.cross_entropy if not Y.is_floating_point() else (lambda out, y: (out - y).square().mean())


def outputs(model, X) -> int:
    with torch.no_grad():
        return model(X)[0].numel()


def check_residual_curves(model, X, Y, n):
    c = A.residual_curves(model, X, max_iter=5)
    assert c.rel.shape == (6, S)
    assert torch.isfinite(c.rel[0]).all() and not torch.isinf(c.rel).any()


def check_trajectories(model, X, Y, n):
    traj = A.collect_trajectories(model, X, max_iter=5)
    assert traj.shape == (6, S, n) and torch.isfinite(traj).all()
    coords, proj = A.project_trajectories(traj)
    assert coords.shape == (6, S, 2) and torch.isfinite(coords).all()


def check_ntk(model, X, Y, n):
    K = A.empirical_ntk(model, X)
    c = outputs(model, X)
    assert K.shape == (S * c, S * c) and torch.isfinite(K).all()
    torch.testing.assert_close(K, K.T, atol=1e-10, rtol=1e-10)
    ev = A.ntk_spectrum(K)
    assert float(ev[-1]) >= -1e-8 * float(ev[0])  # a Gram matrix: positive semi-definite


def check_ntk_trace(model, X, Y, n):
    c = outputs(model, X)
    K = A.empirical_ntk(model, X, mode="trace")
    full = A.empirical_ntk(model, X)
    assert K.shape == (S, S)
    blocks = full.reshape(S, c, S, c).diagonal(dim1=1, dim2=3).sum(-1)
    torch.testing.assert_close(K, blocks, atol=1e-10, rtol=1e-10)


def check_equilibrium_matrix(model, X, Y, n):
    Z = A.equilibrium_matrix(model, X)
    assert Z.shape == (n, S) and torch.isfinite(Z).all()


def check_hessian(model, X, Y, n):
    out = A.hessian_spectrum(model, loss_for(Y), X, Y, k=2, num_iters=6)
    for term in A.hessian.TERMS:
        assert len(out[term]) == 2 and all(torch.isfinite(torch.tensor(out[term])))
    assert out["dim"] == sum(p.numel() for p in A._common.require_deq(model, "").cell.parameters())


def _direct_losses(model, loss_fn, X, Y, directions, coords):
    """The loss at θ* + Σ coords_i d_i by one ordinary forward pass per grid point."""
    p0 = {k: v.detach() for k, v in model.named_parameters()}
    out = []
    model.eval()
    with torch.no_grad():
        for c in coords:
            q = {k: p0[k] + sum(ci * d[k] for ci, d in zip(c, directions)) for k in p0}
            out.append(float(loss_fn(functional_call(model, q, (X,)), Y)))
    return torch.tensor(out)


def check_landscape_1d(model, X, Y, n):
    loss_fn = loss_for(Y)
    d = A.random_directions(model, 1, seed=3)
    land = A.landscape_1d(model, loss_fn, X, Y, steps=3, direction=d[0])
    assert land.loss.shape == (3,) and torch.isfinite(land.loss).all()
    ref = _direct_losses(model, loss_fn, X, Y, d, land.alphas[:, None])
    torch.testing.assert_close(land.loss, ref, atol=1e-8, rtol=1e-6)


def check_landscape_2d(model, X, Y, n):
    loss_fn = loss_for(Y)
    ds = A.random_directions(model, 2, seed=4)
    land = A.landscape_2d(model, loss_fn, X, Y, steps=3, directions=ds)
    assert land.loss.shape == (3, 3) and torch.isfinite(land.loss).all()
    a, b = torch.meshgrid(land.alphas, land.betas, indexing="ij")
    ref = _direct_losses(model, loss_fn, X, Y, ds, torch.stack([a.reshape(-1), b.reshape(-1)], 1))
    torch.testing.assert_close(land.loss.reshape(-1), ref, atol=1e-8, rtol=1e-6)


TOOLS = {
    "residual_curves": check_residual_curves, "trajectories": check_trajectories, "ntk": check_ntk,
    "ntk_trace": check_ntk_trace, "equilibrium_matrix": check_equilibrium_matrix, "hessian": check_hessian,
    "landscape_1d": check_landscape_1d, "landscape_2d": check_landscape_2d,
}


SLOW = {("monotone_conv", "hessian")}  # ~4-8 s: conv2d under forward-mode products is slow on CPU


@pytest.mark.parametrize("name, tool", [
    pytest.param(m, t, marks=pytest.mark.slow) if (m, t) in SLOW else (m, t) for m in MODELS for t in TOOLS])
def test_tool_on_model(name, tool):
    model, X, Y, n = build(name)
    if name == "repeat_k" and tool in NEEDS_DEQ:
        with pytest.raises(TypeError, match="needs a model with an equilibrium layer"):
            TOOLS[tool](model, X, Y, n)
        return
    TOOLS[tool](model, X, Y, n)


def _explicit_jacobian(model, X, **overrides) -> torch.Tensor:
    """J (S, C, P): one reverse pass per sample and output through the model's ordinary forward
    (no vmap, no jacrev), parameters in ``named_parameters`` order."""
    params = [p for _, p in model.named_parameters()]
    rows = []
    for i in range(X.shape[0]):
        y = model(X[i:i + 1], **overrides).reshape(-1)
        rows.append(torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(y[c], params, retain_graph=True)])
                                 for c in range(y.numel())]))
    return torch.stack(rows)


@pytest.mark.parametrize("name", ["monotone", "monotone_conv"])
def test_monotone_ntk_equals_explicit_per_sample_jacobians(name):
    model, X, _, _ = build(name)
    tight = dict(tol=1e-11, max_iter=2000)
    K = A.empirical_ntk(model, X, **tight)
    J = _explicit_jacobian(model, X, **tight)
    ref = J.reshape(-1, J.shape[-1]) @ J.reshape(-1, J.shape[-1]).T
    torch.testing.assert_close(K, ref, atol=1e-8, rtol=1e-7)
