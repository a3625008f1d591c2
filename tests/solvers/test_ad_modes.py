"""Every forward and linear solver under every AD mode: a solver runs on detached values
inside ``no_grad``, but a forward-AD dual level or ``torch.func`` levels of the caller may be
active around it; whatever it does internally (Newton–Krylov's J·v) must not see them.

The problem is z* = tanh(A z* + x) with ‖A‖₂ = 0.5, S = 3 rows of N = 6, float64. It is also
a monotone DEQ (I − A ⪰ ½ I), so the splitting solvers run on it too. Dense reference with
D = diag(1 − z*²):  ż = (I − DA)⁻¹ D ẋ  and  x̄ = D (I − AᵀD)⁻¹ z̄.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from deqdiff import fixed_point
from deqdiff.solvers.splitting import DenseMonotone, get_activation
from solver_problems import FORWARD, LINEAR, gen, with_norm

SPLITTING = ["forward_backward", "peaceman_rachford"]
MODES = ["forward_ad", "jvp", "vmap", "reverse"]
TOL = 1e-12
S, N = 3, 6


def f(z, A, x):
    return torch.tanh(z @ A.T + x)


@pytest.fixture(scope="module")
def problem():
    g_ = gen(7)
    A = with_norm(1, N, 0.5, g_)[0]
    x = torch.randn(S, N, generator=g_, dtype=torch.float64)
    t = torch.randn(S, N, generator=g_, dtype=torch.float64)  # tangent of x
    w = torch.randn(S, N, generator=g_, dtype=torch.float64)  # cotangent of z*
    z = torch.zeros(S, N, dtype=torch.float64)
    for _ in range(200):  # contraction 0.5: exact to rounding
        z = f(z, A, x)
    D = 1 - z**2
    M = torch.eye(N, dtype=torch.float64) - D[:, :, None] * A  # I − DA per row
    z_dot = torch.linalg.solve(M, D * t)
    x_bar = D * torch.linalg.solve(M.mT, w)
    jac = torch.linalg.solve(M, torch.diag_embed(D))  # ∂z*_s/∂x_s per row
    return dict(A=A, x=x, t=t, w=w, z=z, z_dot=z_dot, x_bar=x_bar, jac=jac)


def solve_fn(A, forward: str, backward: str = "auto"):
    """x ↦ z* with the named solvers; splitting solvers get the structure built from x (as the
    monotone models build it: from the values the call sees, under whatever transform)."""

    def solve(x):
        opts: dict = dict(tol=TOL, max_iter=2000, on_fail="raise", backward_solver=backward)
        split = DenseMonotone(A, x, get_activation("tanh"), 0.5) if (forward in SPLITTING or backward in SPLITTING) else None
        if forward in SPLITTING:
            from deqdiff.solvers.splitting import SPLITTING_SOLVERS

            opts.update(solver=SPLITTING_SOLVERS[forward], splitting=split)
        else:
            opts["solver"] = forward
        if backward in SPLITTING:
            from deqdiff.solvers.splitting import SPLITTING_LINEAR_SOLVERS

            opts.update(backward_solver=SPLITTING_LINEAR_SOLVERS[backward], backward_options={"splitting": split})
        return fixed_point(f, torch.zeros_like(x), A, x, batch_ndim=1, **opts)

    return solve


def check_mode(mode: str, solve, p) -> None:
    x, t, w = p["x"], p["t"], p["w"]
    close = dict(atol=1e-9, rtol=0)
    if mode == "forward_ad":
        with fwAD.dual_level():
            z = solve(fwAD.make_dual(x, t))
            z, z_dot = fwAD.unpack_dual(z)
        torch.testing.assert_close(z, p["z"], **close)
        torch.testing.assert_close(z_dot, p["z_dot"], **close)
    elif mode == "jvp":
        z, z_dot = torch.func.jvp(solve, (x,), (t,))
        torch.testing.assert_close(z, p["z"], **close)
        torch.testing.assert_close(z_dot, p["z_dot"], **close)
    elif mode == "vmap":  # per-sample solves stacked by vmap, and per-sample Jacobians under vmap
        one = lambda xi: solve(xi[None])[0]  # noqa: E731
        torch.testing.assert_close(torch.func.vmap(one)(x), p["z"], **close)
        torch.testing.assert_close(torch.func.vmap(torch.func.jacrev(one))(x), p["jac"], **close)
    else:
        xr = x.clone().requires_grad_(True)
        z = solve(xr)
        (x_bar,) = torch.autograd.grad((z * w).sum(), xr)
        torch.testing.assert_close(z.detach(), p["z"], **close)
        torch.testing.assert_close(x_bar, p["x_bar"], **close)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("forward", FORWARD + SPLITTING)
def test_forward_solver_under_ad_mode(forward, mode, problem):
    check_mode(mode, solve_fn(problem["A"], forward), problem)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backward", LINEAR + SPLITTING)
def test_linear_solver_under_ad_mode(backward, mode, problem):
    forward = "peaceman_rachford" if backward in SPLITTING else "anderson"
    solve = solve_fn(problem["A"], forward, backward)
    if backward in SPLITTING and mode == "vmap":
        # the splitting derivative solve would see the structure's vmapped values outside their level
        with pytest.raises(NotImplementedError, match="backward_solver 'pr'/'fb'.*'auto'"):
            check_mode(mode, solve, problem)
        return
    check_mode(mode, solve, problem)


def test_newton_krylov_inside_an_outer_dual_level_keeps_its_tangents_out(problem):
    """The solver's J·v products must not mix with the caller's tangents: a dual x whose
    tangent is zero gives a zero tangent, a dual A (every param dual) the dense answer."""
    A, x = problem["A"], problem["x"]
    with fwAD.dual_level():
        z = fixed_point(f, torch.zeros_like(x), A, fwAD.make_dual(x, torch.zeros_like(x)),
                        solver="newton_krylov", tol=TOL, batch_ndim=1, on_fail="raise")
        assert torch.equal(fwAD.unpack_dual(z).tangent, torch.zeros_like(x))
        dA = torch.randn_like(A)
        z = fixed_point(f, torch.zeros_like(x), fwAD.make_dual(A, dA), x, solver="newton_krylov", tol=TOL,
                        batch_ndim=1, on_fail="raise")
        z_p, z_dot = fwAD.unpack_dual(z)
    D = 1 - z_p**2
    M = torch.eye(N, dtype=torch.float64) - D[:, :, None] * A
    ref = torch.linalg.solve(M, D * (z_p @ dA.T))
    torch.testing.assert_close(z_dot, ref, atol=1e-9, rtol=0)
