"""Scale invariance: a fixed-point problem multiplied by any representable scale c
(z̃ = c·f(z̃/c, …)) gives the same relative accuracy in the forward solve, in every
derivative solve (reverse, with cotangents of any scale) and in forward-mode tangents, for
float32 (1e-30 … 1e30) and float64 (1e-300 … 1e300); 0 comes back only when the answer is 0."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import deqdiff
from tests.conftest import contractive_matrix

TOL = {torch.float32: 1e-6, torch.float64: 1e-12}
EXPONENT = {torch.float32: 30, torch.float64: 300}
FORWARD = ["fixed_point", "anderson", "broyden", "newton_krylov"]
BACKWARD = ["auto", "dense", "richardson", "gmres", "bicgstab", "anderson"]


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative error computed in float64 on values already brought to scale 1."""
    a, ref = a.detach().double(), ref.detach().double()
    return float((a - ref).norm() / ref.norm())


def problem(seed: int, dtype):
    g = torch.Generator().manual_seed(seed)
    A = contractive_matrix(4, 0.6, g).to(dtype)
    x = torch.randn(3, 4, generator=g).to(dtype)
    return A, x


def reference(A, x):
    """z*, its vjp with an all-ones cotangent, and its jvp along ones, in float64 at scale 1."""
    A, x = A.double(), x.double()
    z = deqdiff.fixed_point(lambda z, A, x: torch.tanh(z @ A.T + x), torch.zeros_like(x), A,
                            x.requires_grad_(), tol=1e-14, max_iter=500, batch_ndim=1)
    (gx,) = torch.autograd.grad(z, x, torch.ones_like(z))
    with torch.no_grad():
        D = 1 - z**2
        J = D[:, :, None] * A
        zdot = torch.linalg.solve(torch.eye(4) - J, D)  # (I − J) ż = ∂f/∂x·1
    return z.detach(), gx, zdot


scales = st.fixed_dictionaries(dict(
    seed=st.integers(0, 1000),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    e=st.floats(-1.0, 1.0),  # scale exponent as a fraction of the dtype's range
    e_out=st.floats(-1.0, 1.0),  # cotangent / tangent scale exponent (clamped: c·s representable)
    solver=st.sampled_from(FORWARD),
    backward=st.sampled_from(BACKWARD),
))


@settings(max_examples=60, deadline=None)
@given(scales)
def test_forward_reverse_and_tangent_accuracy_does_not_depend_on_scale(p):
    dtype = p["dtype"]
    E = EXPONENT[dtype]
    ec = round(p["e"] * E)
    es = min(max(round(p["e_out"] * E), -E - ec), E - ec)  # derivatives c·s stay representable
    c, s = 10.0**ec, 10.0**es
    A, x = problem(p["seed"], dtype)
    z_ref, gx_ref, zdot_ref = reference(A, x)

    def f(z, A, x):  # the scale-1 map conjugated by z ↦ c·z
        return c * torch.tanh((z / c) @ A.T + x)

    x = x.clone().requires_grad_()
    tol = TOL[dtype]
    z = deqdiff.fixed_point(f, torch.zeros_like(x), A, x, solver=p["solver"], tol=tol, max_iter=500,
                            batch_ndim=1, backward_solver=p["backward"], on_fail="raise")
    assert rel(z.double() / c, z_ref) < 50 * tol
    (gx,) = torch.autograd.grad(z, x, torch.full_like(z, s))  # = c·s·gx_ref
    assert bool((gx != 0).all())
    assert rel(gx.double() / c / s, gx_ref) < 50 * tol
    with torch.autograd.forward_ad.dual_level():
        xd = torch.autograd.forward_ad.make_dual(x.detach(), torch.full_like(x, s))
        zd = deqdiff.fixed_point(f, torch.zeros_like(x), A, xd, solver=p["solver"], tol=tol, max_iter=500,
                                 batch_ndim=1, backward_solver=p["backward"], on_fail="raise")
        zdot = torch.autograd.forward_ad.unpack_dual(zd).tangent
    assert rel(zdot.double() / c / s, zdot_ref) < 50 * tol


@pytest.mark.parametrize("backward", BACKWARD)
def test_tiny_cotangent_float32_is_not_a_silent_zero(backward):
    # 1e-24 / (1 − 0.5·sech²(z*)) per entry: the squared norm of 1e-24 underflows float32
    x = torch.ones(4, dtype=torch.float32, requires_grad=True)
    z = deqdiff.fixed_point(lambda z, x: 0.5 * torch.tanh(z) + x, torch.zeros(4, dtype=torch.float32), x,
                            backward_solver=backward)
    (g,) = torch.autograd.grad(z, x, torch.full((4,), 1e-24, dtype=torch.float32))
    zs = z.detach().double()
    expect = 1e-24 / (1 - 0.5 / torch.cosh(zs) ** 2)
    assert rel(g, expect) < 1e-5


@pytest.mark.parametrize("solver", FORWARD)
@pytest.mark.parametrize("value", [1e-24, 1e-20, 1e30])
def test_tiny_and_huge_forward_solves_in_float32(solver, value):
    x = torch.full((4,), value, dtype=torch.float32)
    z, info = deqdiff.fixed_point(lambda z, x: 0.5 * z + x, torch.zeros(4, dtype=torch.float32), x,
                                  solver=solver, return_info=True, on_fail="raise")
    assert rel(z.double() / value, torch.full((4,), 2.0, dtype=torch.float64)) < 1e-5
    assert info.forward.max_iterations > 0  # 0 iterations was the old "converged" zero
    # residuals are reported in the caller's units
    assert float(info.forward.residual.max()) <= 1e-6 * float(torch.linalg.vector_norm(z.double()))


def test_rows_of_different_scales_in_one_batch():
    x = torch.tensor([[1e-30] * 3, [1.0] * 3, [1e30] * 3], dtype=torch.float32)
    z = deqdiff.fixed_point(lambda z, x: 0.5 * z + x, torch.zeros_like(x), x, batch_ndim=1)
    assert rel(z.double() / x.double(), torch.full((3, 3), 2.0, dtype=torch.float64)) < 1e-5


def test_zero_answer_stays_exactly_zero():
    x = torch.zeros(4, dtype=torch.float32, requires_grad=True)
    z = deqdiff.fixed_point(lambda z, x: 0.5 * torch.tanh(z) + x, torch.zeros(4, dtype=torch.float32), x)
    assert bool((z == 0).all())
    (g,) = torch.autograd.grad(z, x, torch.zeros(4, dtype=torch.float32))
    assert bool((g == 0).all())


def test_row_norm_is_accurate_at_every_scale():
    from deqdiff.solvers.base import row_norm

    for dtype, e in ((torch.float32, 38), (torch.float64, 307)):
        v = torch.tensor([[3.0, 4.0]], dtype=dtype)
        for k in range(-e, e + 1, 7):
            scale = 10.0 ** k
            n = row_norm(v * scale)
            assert abs(float(n) / (5 * scale) - 1) < 1e-6, (dtype, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("solver", ["dense", "gmres", "bicgstab", "auto"])
def test_linear_solve_equation_multiplied_by_any_scale(dtype, solver):
    g = torch.Generator().manual_seed(0)
    M = (torch.eye(5) + 0.3 * torch.randn(5, 5, generator=g) / 5**0.5).to(dtype)
    b = torch.randn(5, generator=g).to(dtype)
    ref = torch.linalg.solve(M.double(), b.double())
    e = EXPONENT[dtype]
    for c in (10.0 ** -e, 10.0 ** (-e // 2), 10.0 ** (e // 2), 10.0**e):
        # the whole equation scaled: same x
        x = deqdiff.linear_solve(lambda v, M: c * (M @ v), c * b, M, solver=solver, tol=TOL[dtype], on_fail="raise")
        assert rel(x, ref) < 1e3 * TOL[dtype]
        # only b scaled: x scales with it
        x = deqdiff.linear_solve(lambda v, M: M @ v, c * b, M, solver=solver, tol=TOL[dtype], on_fail="raise")
        assert rel(x.double() / c, ref) < 1e3 * TOL[dtype]
