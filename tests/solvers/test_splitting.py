"""Splitting solvers (solvers/splitting.py): proxes, FB/PR against exact references, the
admissible FB step, Fourier structure against dense linear algebra, derivative splitting."""

from __future__ import annotations


import pytest
import torch

from deqdiff import fixed_point
from deqdiff.models.monotone_conv import FourierMonotone, MonotoneConv, circular_conv, circular_conv_adjoint, conv_symbol
from deqdiff.solvers import ConvergenceError
from deqdiff.solvers.splitting import (
    DenseMonotone,
    fb_contraction_factor,
    forward_backward,
    forward_backward_linear,
    get_activation,
    peaceman_rachford,
    peaceman_rachford_linear,
)

torch.set_default_dtype(torch.float64)


def monotone_W(n: int, m: float, gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    A = scale * torch.randn(n, n, generator=gen) / n**0.5
    B = scale * torch.randn(n, n, generator=gen) / n**0.5
    return (1 - m) * torch.eye(n) - A.T @ A + B - B.T


def problem(seed: int, n: int = 12, S: int = 4, m: float = 0.1, scale: float = 1.0, act: str = "relu"):
    gen = torch.Generator().manual_seed(seed)
    W = monotone_W(n, m, gen, scale)
    c = torch.randn(S, n, generator=gen)
    split = DenseMonotone(W, c, get_activation(act), m)
    sigma = split.activation

    def f(z, W, c):
        return sigma(z @ W.T + c)

    return split, f, W, c


def exact_relu_fixed_point(W: torch.Tensor, c: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Solve the piecewise-linear system on the active set of ``z``: (I − D W) z = D c."""
    out = []
    for zi, ci in zip(z, c):
        d = ((zi @ W.T + ci) > 0).to(W.dtype)
        sol = torch.linalg.solve(torch.eye(len(d)) - d[:, None] * W, d * ci)
        assert torch.equal((sol @ W.T + ci) > 0, d.bool()), "active set not self-consistent"
        out.append(sol)
    return torch.stack(out)


# ---------------------------------------------------------------------------- activations


@pytest.mark.parametrize("name", ["relu", "leaky_relu", "tanh", "softplus"])
@pytest.mark.parametrize("alpha", [0.05, 0.5, 1.0, 3.0, 40.0])
def test_prox_optimality(name, alpha):
    """prox^α_f = (I + α∂f)⁻¹ with ∂f(z) = σ⁻¹(z) − z: for z = σ(y) the point
    x = z + α(y − z) must map back to z; prox¹ = σ; the prox is monotone and nonexpansive."""
    act = get_activation(name)
    y = torch.linspace(-6, 6, 241)
    z = act(y)
    if name == "relu":  # ∂f(0) = (−∞, 0]: every x ≤ 0 maps to 0
        assert torch.equal(act.prox(y, alpha), y.clamp_min(0))
        return
    x = z + alpha * (y - z)
    assert torch.allclose(act.prox(x, alpha), z, atol=1e-12, rtol=1e-10)
    assert torch.allclose(act.prox(y, 1.0), z, atol=1e-14)
    xs = torch.linspace(-50, 50, 2001)
    p = act.prox(xs, alpha)
    assert torch.all(p[1:] >= p[:-1])  # nondecreasing
    assert torch.all((p[1:] - p[:-1]) <= (xs[1:] - xs[:-1]) + 1e-12)  # nonexpansive


def test_bad_activation_names_the_choices():
    with pytest.raises(ValueError, match="relu, leaky_relu, tanh or softplus"):
        get_activation("sigmoid")
    with pytest.raises(ValueError, match="slope"):
        get_activation("leaky_relu", slope=2.0)


# ---------------------------------------------------------------------------- forward solvers


@pytest.mark.parametrize("seed", range(12))
def test_splitting_finds_the_unique_fixed_point(seed):
    """Random A, B, m: FB and PR reach the exact piecewise-linear solution and Anderson's."""
    gen = torch.Generator().manual_seed(100 + seed)
    m = float(torch.empty(()).uniform_(0.05, 0.5, generator=gen))
    scale = float(torch.empty(()).uniform_(0.3, 1.5, generator=gen))
    split, f, W, c = problem(seed, n=10 + seed, S=3, m=m, scale=scale)
    z0 = torch.zeros_like(c)
    ref = fixed_point(f, z0, W, c, solver="anderson", tol=1e-13, max_iter=2000, batch_ndim=1, on_fail="raise")
    exact = exact_relu_fixed_point(W, c, ref)
    assert torch.allclose(ref, exact, atol=1e-10)
    for solver, opts in ((peaceman_rachford, {}), (forward_backward, {}), (peaceman_rachford, {"alpha": 0.2})):
        z, info = fixed_point(f, z0, W, c, solver=solver, splitting=split, tol=1e-11, max_iter=50_000,
                              batch_ndim=1, on_fail="raise", return_info=True, **opts)
        assert info.forward.all_converged
        assert torch.allclose(z, exact, atol=1e-8 * (1 + exact.norm())), solver.__name__


@pytest.mark.parametrize("act", ["leaky_relu", "tanh", "softplus"])
def test_other_activations_converge(act):
    split, f, W, c = problem(7, n=15, m=0.4, scale=0.7, act=act)
    z0 = torch.zeros_like(c)
    ref = fixed_point(f, z0, W, c, solver="anderson", tol=1e-12, max_iter=2000, batch_ndim=1, on_fail="raise")
    for solver in (peaceman_rachford, forward_backward):
        for alpha in ((0.5, 2.0) if solver is peaceman_rachford else (None,)):
            z = fixed_point(f, z0, W, c, solver=solver, splitting=split, alpha=alpha, tol=1e-10,
                            max_iter=20_000, batch_ndim=1, on_fail="raise")
            assert torch.allclose(z, ref, atol=1e-8)
            assert torch.allclose(z, split.activation(z @ W.T + c), atol=1e-9)


@pytest.mark.parametrize("alpha", [5.0, 30.0, 100.0])
def test_pr_converges_for_large_alpha(alpha):
    split, f, W, c = problem(3, n=20, m=0.2)
    z0 = torch.zeros_like(c)
    z, info = fixed_point(f, z0, W, c, solver=peaceman_rachford, splitting=split, alpha=alpha, tol=1e-9,
                          max_iter=20_000, batch_ndim=1, on_fail="raise", return_info=True)
    assert info.forward.all_converged
    assert torch.allclose(z, split.activation(z @ W.T + c), atol=1e-7)


def test_fb_alpha_outside_range_is_refused_and_divergence_reported():
    split, f, W, c = problem(4, n=16, m=0.05, scale=1.5)
    bound = split.alpha_bound()
    z0 = torch.zeros_like(c)
    with pytest.raises(ValueError, match=r"\(0, 2m/L²\)"):
        fixed_point(f, z0, W, c, solver=forward_backward, splitting=split, alpha=1.5 * bound, batch_ndim=1)
    # W = (1 − m)I + B − Bᵀ with σ = identity (leaky slope 1): FB is z ← (I − α(I − W))z + αc whose
    # eigenvalues have modulus² (1 − αm)² + α²σ_k², all > 1 once α > 2m/L²: it must diverge
    gen = torch.Generator().manual_seed(9)
    n, m = 16, 0.05
    B = torch.randn(n, n, generator=gen) / n**0.5
    W = (1 - m) * torch.eye(n) + B - B.T
    ident = get_activation("leaky_relu", slope=1.0)
    lin = DenseMonotone(W, c, ident, m)

    def g(z, W, c):
        return ident(z @ W.T + c)

    with pytest.warns(RuntimeWarning, match="outside the admissible range"):
        with pytest.raises(ConvergenceError, match="residual") as err:
            fixed_point(g, z0, W, c, solver=forward_backward, splitting=lin, alpha=10 * lin.alpha_bound(),
                        check_alpha="warn", tol=1e-8, max_iter=400, batch_ndim=1, on_fail="raise")
    info = err.value.info
    assert not info.all_converged
    grew = ~torch.isfinite(info.residual) | (info.residual > 10 * info.abs_trace[1])
    assert bool(grew.all())
    # inside the range (0.9 of the bound) FB converges
    split, f, W, c = problem(4, n=16, m=0.3, scale=1.0)
    z = fixed_point(f, z0, W, c, solver=forward_backward, splitting=split, alpha=0.9 * split.alpha_bound(),
                    tol=1e-9, max_iter=20_000, batch_ndim=1, on_fail="raise")
    assert torch.allclose(z, f(z, W, c), atol=1e-7)


def test_fb_contraction_factor_bounds_the_linear_part():
    """Proposition 3: ‖I − α(I − W)‖₂ ≤ √(1 − 2αm + α²L²), < 1 inside (0, 2m/L²)."""
    for seed in range(10):
        split, *_ = problem(seed, n=14, m=0.1 + 0.03 * seed)
        L, m = split.op_norm(), split.m
        I = torch.eye(14)
        for frac in (0.1, 0.5, 0.99):
            alpha = frac * split.alpha_bound()
            T = I - alpha * (I - split.W)
            q = fb_contraction_factor(alpha, m, L)
            assert float(torch.linalg.matrix_norm(T, 2)) <= q + 1e-12
            assert q < 1


def test_structure_mismatch_and_shape_errors():
    split, f, W, c = problem(1)
    z0 = torch.zeros_like(c)
    with pytest.raises(ValueError, match="does not describe"):
        fixed_point(f, z0, W, c + 1.0, solver=peaceman_rachford, splitting=split, tol=1e-8, batch_ndim=1)
    with pytest.raises(ValueError, match="rows of shape"):
        fixed_point(f, z0[:2], W, c[:2], solver=peaceman_rachford, splitting=split, batch_ndim=1)


def test_trajectory_and_info_conventions():
    split, f, W, c = problem(2)
    z, info = fixed_point(f, torch.zeros_like(c), W, c, solver=peaceman_rachford, splitting=split, tol=1e-6,
                          batch_ndim=1, return_info=True, store_trajectory=True)
    fw = info.forward
    assert fw.solver == "peaceman_rachford" and fw.kind == "forward"
    assert len(fw.trajectory) == fw.abs_trace.shape[0] == fw.max_iterations + 1
    gz = f(z, W, c)
    assert torch.all((gz - z).norm(dim=1) <= 1e-6 * gz.norm(dim=1) * (1 + 1e-9))


# ---------------------------------------------------------------------------- derivative splitting


@pytest.mark.parametrize("linear", [peaceman_rachford_linear, forward_backward_linear])
def test_derivative_splitting_matches_dense(linear):
    split, f, W, c = problem(5, n=12, S=3, act="tanh")
    W = W.clone().requires_grad_()
    c = c.clone().requires_grad_()
    z0 = torch.zeros_like(c)
    grads = {}
    for name, bsolver, bopts in (("dense", "dense", None), ("split", linear, {"splitting": split})):
        z = fixed_point(f, z0, W, c, solver=peaceman_rachford, splitting=split, tol=1e-12, max_iter=2000,
                        batch_ndim=1, on_fail="raise", backward_solver=bsolver, backward_options=bopts,
                        backward_tol=1e-12, backward_max_iter=50_000)
        loss = (z**3).sum()
        gW, gc = torch.autograd.grad(loss, (W, c), create_graph=True)
        hvp = torch.autograd.grad((gc**2).sum() + (gW * W).sum(), c)[0]  # second order (forward-mode systems too)
        grads[name] = (gW, gc, hvp)
    for a, b in zip(grads["dense"], grads["split"]):
        assert torch.allclose(a, b, atol=1e-9, rtol=1e-8)


def test_derivative_splitting_needs_a_point():
    split, f, W, c = problem(6)
    op = type("Op", (), {"transposed": True, "mv": lambda self, v: v})()
    with pytest.raises(ValueError, match="set_point"):
        peaceman_rachford_linear(op, c, None, splitting=split)


# ---------------------------------------------------------------------------- Fourier structure


def dense_conv_W(split: FourierMonotone) -> torch.Tensor:
    N = split.c.shape[1]
    return split.matvec(torch.eye(N)).T  # column j = W e_j


@pytest.mark.parametrize("seed", range(4))
def test_fourier_resolvent_matches_dense_inverse(seed):
    torch.manual_seed(seed)
    C, H, Wd = 2 + seed % 2, 4, 5 + seed % 2
    cell = MonotoneConv(1, C, (H, Wd), m=0.05 + 0.1 * seed, kernel_size=3)
    split = cell.structure(torch.randn(2, 1, H, Wd))
    Wm = dense_conv_W(split)
    N = Wm.shape[0]
    I = torch.eye(N)
    z = torch.randn(3, N)
    assert torch.allclose(split.matvec(z, transposed=True), z @ Wm, atol=1e-12)
    eig = torch.linalg.eigvalsh(I - 0.5 * (Wm + Wm.T))
    assert float(eig.min()) >= split.m - 1e-10  # I − W ⪰ mI
    assert abs(split.op_norm() - float(torch.linalg.matrix_norm(I - Wm, 2))) < 1e-10
    for alpha in (0.1, 1.0, 7.0):
        R = torch.linalg.inv(I + alpha * (I - Wm))
        assert torch.allclose(split.resolvent(z, alpha), z @ R.T, atol=1e-12)
        assert torch.allclose(split.resolvent(z, alpha, transposed=True), z @ R, atol=1e-12)


def test_conv_symbol_and_adjoint():
    gen = torch.Generator().manual_seed(0)
    K = torch.randn(3, 2, 3, 3, generator=gen)
    x = torch.randn(4, 2, 5, 6, generator=gen)
    y = torch.randn(4, 3, 5, 6, generator=gen)
    assert torch.allclose((circular_conv(x, K) * y).sum(), (x * circular_conv_adjoint(y, K)).sum())
    sym = conv_symbol(K, 5, 6)  # (H, W, 3, 2)
    xh = torch.fft.fft2(x).permute(0, 2, 3, 1).unsqueeze(-1)
    via = torch.fft.ifft2((sym @ xh).squeeze(-1).permute(0, 3, 1, 2)).real
    assert torch.allclose(via, circular_conv(x, K), atol=1e-12)
    with pytest.raises(ValueError, match="smaller than"):
        conv_symbol(K, 2, 6)
