"""Every PyTorch differentiation entry point through every way to build a fixed point.

The grid: {``fixed_point`` × every forward solver × every linear (derivative) solver,
``linear_solve`` × every linear solver, ``DEQ`` × every forward solver, ``MonotoneDEQ`` ×
its splitting and engine solvers (forward and derivative)} × {reverse to second order with
``create_graph``, ``forward_ad`` dual numbers, ``torch.func`` jvp / jacrev / jacfwd /
hessian / vmap, ``autograd.grad(is_grads_batched=True)``,
``autograd.functional.jacobian/hessian(vectorize=True)``, ``gradcheck``/``gradgradcheck``
with ``check_batched_grad``}. Each result is compared with the same entry point applied to
an independent float64 reference: autodiff through 120 unrolled iterations of a map that
contracts by 0.3 (error 0.3¹²⁰), or a dense ``torch.linalg.solve``. The one composition
PyTorch cannot do for custom Functions, forward-over-forward, is refused with an error
(last test)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import deqdiff
from deqdiff.models import MonotoneDEQ
from tests.conftest import contractive_matrix

FORWARD = ["fixed_point", "anderson", "broyden", "newton_krylov"]
LINEAR = ["auto", "dense", "richardson", "gmres", "bicgstab", "anderson"]
TOL = 1e-11


def _grad2(g, x):
    """Reverse over reverse: ∇ₓ ‖g(x)‖² and ∇ₓ of the sum of that gradient's cube."""
    x = x.detach().requires_grad_()
    (gx,) = torch.autograd.grad(g(x).pow(2).sum(), x, create_graph=True)
    (gxx,) = torch.autograd.grad(gx.pow(3).sum(), x)
    return torch.cat([gx.detach().flatten(), gxx.flatten()])


def _forward_ad(g, x):
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        out = g(fwAD.make_dual(x, torch.cos(torch.arange(x.numel(), dtype=x.dtype)).reshape(x.shape)))
        return fwAD.unpack_dual(out).tangent


def _batched_grad(g, x):
    x = x.detach().requires_grad_()
    y = g(x)
    eye = torch.eye(y.numel(), dtype=x.dtype).reshape(y.numel(), *y.shape)
    return torch.autograd.grad(y, x, eye, is_grads_batched=True)[0]


def _batched_grad_then_grad(g, x):
    """Second order through the batched entry point: the Jacobian by one
    ``is_grads_batched`` call with ``create_graph``, then ∇ₓ of the sum of its cube."""
    x = x.detach().requires_grad_()
    y = g(x)
    eye = torch.eye(y.numel(), dtype=x.dtype).reshape(y.numel(), *y.shape)
    (jac,) = torch.autograd.grad(y, x, eye, is_grads_batched=True, create_graph=True)
    return torch.autograd.grad(jac.pow(3).sum(), x)[0]


def _vectorized_jacobian_then_grad(g, x):
    x = x.detach().requires_grad_()
    jac = torch.autograd.functional.jacobian(g, x, vectorize=True, create_graph=True)
    return torch.autograd.grad(jac.pow(3).sum(), x)[0]


def _scalar(g):
    return lambda x: torch.sin(g(x)).sum()


MODES = {
    "reverse_create_graph": _grad2,
    "forward_ad": _forward_ad,
    "jvp": lambda g, x: torch.func.jvp(g, (x,), (torch.ones_like(x),))[1],
    "jacrev": lambda g, x: torch.func.jacrev(g)(x),
    "jacfwd": lambda g, x: torch.func.jacfwd(g)(x),
    "hessian": lambda g, x: torch.func.hessian(_scalar(g))(x),
    "vmap": lambda g, x: torch.func.vmap(g)(torch.stack([x, 0.5 * x, -x])),
    "is_grads_batched": _batched_grad,
    "is_grads_batched_then_grad": _batched_grad_then_grad,
    "vectorize_jacobian": lambda g, x: torch.autograd.functional.jacobian(g, x, vectorize=True),
    "vectorize_jacobian_then_grad": _vectorized_jacobian_then_grad,
    "vectorize_hessian": lambda g, x: torch.autograd.functional.hessian(_scalar(g), x, vectorize=True),
}


def _close(a, b, tol):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    assert a.shape == b.shape
    assert float((a - b).norm()) <= tol * max(1.0, float(b.norm())), float((a - b).norm() / b.norm())


# --------------------------------------------------------------------------- fixed_point

N = 3
_g = torch.Generator().manual_seed(7)
A_FP = contractive_matrix(N, 0.3, _g)
X_FP = torch.randn(N, generator=_g)


def _cell(z, A, x):
    return torch.tanh(z @ A.T + x)


def _unrolled(x):
    z = torch.zeros_like(x)
    for _ in range(120):
        z = _cell(z, A_FP, x)
    return z


def _implicit(solver, backward):
    return lambda x: deqdiff.fixed_point(_cell, torch.zeros_like(x), A_FP, x, solver=solver, tol=TOL,
                                         max_iter=300, backward_solver=backward, on_fail="raise")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backward", LINEAR)
@pytest.mark.parametrize("solver", FORWARD)
def test_fixed_point(solver, backward, mode):
    _close(MODES[mode](_implicit(solver, backward), X_FP), MODES[mode](_unrolled, X_FP), 1e-8)


@pytest.mark.parametrize("backward", LINEAR)
@pytest.mark.parametrize("solver", FORWARD)
def test_fixed_point_gradcheck_batched(solver, backward):
    g = _implicit(solver, backward)
    x = X_FP.clone().requires_grad_()
    assert torch.autograd.gradcheck(g, (x,), check_batched_grad=True)
    assert torch.autograd.gradgradcheck(g, (x,), check_batched_grad=True)


# --------------------------------------------------------------------------- linear_solve

M_LS = torch.eye(N) + 0.3 * contractive_matrix(N, 1.0, _g)


def _matvec(v, M, x):  # A(x) v = M v + 0.2·tanh(x) ⊙ v: the operator depends on x too
    return v @ M.T + 0.2 * torch.tanh(x) * v


def _dense_ls(x):
    return torch.linalg.solve(M_LS + 0.2 * torch.diag(torch.tanh(x)), x)


def _implicit_ls(solver):
    return lambda x: deqdiff.linear_solve(_matvec, x, M_LS, x, solver=solver, tol=TOL, max_iter=500,
                                          on_fail="raise", **({"omega": 0.8} if solver == "richardson" else {}))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("solver", LINEAR)
def test_linear_solve(solver, mode):
    _close(MODES[mode](_implicit_ls(solver), X_FP), MODES[mode](_dense_ls, X_FP), 1e-8)


@pytest.mark.parametrize("solver", LINEAR)
def test_linear_solve_gradcheck_batched(solver):
    x = X_FP.clone().requires_grad_()
    assert torch.autograd.gradcheck(_implicit_ls(solver), (x,), check_batched_grad=True)
    assert torch.autograd.gradgradcheck(_implicit_ls(solver), (x,), check_batched_grad=True)


# --------------------------------------------------------------------------- DEQ and MonotoneDEQ

class _TanhCell(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(N, N)
        with torch.no_grad():
            self.lin.weight.copy_(A_FP)
            self.lin.bias.fill_(0.1)

    def forward(self, z, x):
        return torch.tanh(self.lin(z) + x)


def _deq_fn(deq):
    return lambda x: deq(x[None])[0]


def _unrolled_module(cell):
    def run(x):
        z = torch.zeros(1, N, dtype=x.dtype)
        for _ in range(120):
            z = cell(z, x[None])
        return z[0]
    return run


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("solver", FORWARD)
def test_deq_layer(solver, mode):
    cell = _TanhCell()
    deq = deqdiff.DEQ(cell, solver=solver, tol=TOL, max_iter=300, on_fail="raise")
    _close(MODES[mode](_deq_fn(deq), X_FP), MODES[mode](_unrolled_module(cell), X_FP), 1e-8)


def _monotone(solver, backward):
    torch.manual_seed(3)
    model = MonotoneDEQ(N, N, 2, m=0.8, activation="tanh", solver=solver, backward_solver=backward,
                        tol=TOL, max_iter=400)
    with torch.no_grad():  # small A, B: W ≈ 0.2·I, so plain iteration contracts (a valid reference)
        model.deq.cell.A.weight.mul_(0.1)
        model.deq.cell.B.weight.mul_(0.1)
    return model


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("solver,backward", [("pr", "auto"), ("fb", "auto"), ("pr", "pr"), ("fb", "fb"),
                                             ("anderson", "gmres")])
def test_monotone_deq(solver, backward, mode):
    model = _monotone(solver, backward)
    implicit = lambda x: model.equilibrium(x[None])[0]  # noqa: E731
    _close(MODES[mode](implicit, X_FP), MODES[mode](_unrolled_module(model.cell), X_FP), 1e-8)


# --------------------------------------------------------------------------- refused

def test_forward_over_forward_is_refused_with_a_clear_error():
    with pytest.raises(NotImplementedError, match="forward-over-forward"):
        torch.func.jacfwd(torch.func.jacfwd(_implicit("anderson", "auto")))(X_FP)
