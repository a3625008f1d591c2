"""A small DEQ whose derivatives of orders 1–3 are checked against unrolled autodiff.

``deqdiff demo`` runs it: the quickest evidence that the engine is exact on this machine.
"""

from __future__ import annotations

import torch

from .engine import fixed_point


def _cell(z, A, U, x):
    return torch.tanh(z @ A.T + x @ U.T)


def _unrolled(z0, A, U, x, iters=400):
    z = z0
    for _ in range(iters):
        z = _cell(z, A, U, x)
    return z


def _derivatives(solve, A, U, x):
    """(1) ∇_A L, (2) the PINN pattern: ∂(Σz)/∂x then ∇_A of its square, (3) third order."""
    z = solve(A, U, x)
    L = (z**3).sum()
    (g1,) = torch.autograd.grad(L, A, create_graph=True)
    (dzdx,) = torch.autograd.grad(z.sum(), x, create_graph=True)
    (g2,) = torch.autograd.grad((dzdx**2).sum(), A, create_graph=True)
    (g3,) = torch.autograd.grad((g2**2).sum(), A)
    return {"gradient (order 1)": g1, "PINN pattern d/dA‖∂z/∂x‖² (order 2)": g2, "order 3": g3}


def run(n: int = 16, batch: int = 8, rho: float = 0.6, seed: int = 0, solver: str = "anderson") -> dict:
    torch.manual_seed(seed)
    dt = torch.float64
    A = torch.randn(n, n, dtype=dt)
    A = (rho * A / torch.linalg.matrix_norm(A, 2)).requires_grad_()
    U = torch.randn(n, 3, dtype=dt)
    x = torch.randn(batch, 3, dtype=dt, requires_grad=True)
    z0 = torch.zeros(batch, n, dtype=dt)
    infos = []

    def implicit(A, U, x):
        z, info = fixed_point(_cell, z0, A, U, x, solver=solver, tol=1e-12, max_iter=500, batch_ndim=1,
                              return_info=True)
        infos.append(info)
        return z

    ours = _derivatives(implicit, A, U, x)
    ref = _derivatives(lambda A, U, x: _unrolled(z0, A, U, x), A, U, x)
    errors = {k: float((ours[k] - ref[k]).detach().norm() / ref[k].detach().norm()) for k in ours}
    info = infos[0]
    return dict(
        errors=errors,
        forward_iterations=info.forward.max_iterations, derivative_solves=len(info.derivatives),
        derivative_iterations=[d.max_iterations for d in info.derivatives],
    )


def main(args) -> int:
    res = run(n=args.n, batch=args.batch, rho=args.rho, seed=args.seed, solver=args.solver)
    print(f"deqdiff demo: z* = tanh(A z* + U x), n={args.n}, batch={args.batch}, ‖A‖₂={args.rho}, float64, tol 1e-12")
    print(f"forward solve ({args.solver}): {res['forward_iterations']} iterations; "
          f"{res['derivative_solves']} derivative solves "
          f"(iterations {res['derivative_iterations']})")
    print(f"{'derivative':45s} rel. error vs unrolled autodiff")
    ok = True
    for k, e in res["errors"].items():
        ok &= e < 1e-8
        print(f"{k:45s} {e:.2e}  {'ok' if e < 1e-8 else 'FAIL'}")
    return 0 if ok else 1
