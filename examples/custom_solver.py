"""Writing your own forward solver, registering it, and using it in ``deqdiff.fixed_point``.

A forward solver receives the map g on a 2-D state (S samples × N unknowns) and returns the
fixed point and a ``SolveInfo``; ``deqdiff.register_solver`` makes it available by name. Here:
Anderson acceleration with memory m = 1 (Walker & Ni 2011, "Anderson acceleration for
fixed-point iterations"), per sample. The solver only finds z*; every derivative is still
an implicit solve with (I − ∂f/∂z) at z* (Bai, Kolter & Koltun 2019, "Deep Equilibrium
Models", Theorem 1), so gradients agree with any other solver's up to the tolerance.

Run:  python examples/custom_solver.py           (width 200, 256 samples, seconds)
      python examples/custom_solver.py --quick   (smaller)
"""
import argparse

import torch

import deqdiff
from deqdiff.solvers import Tracker  # the per-sample stopping rule and statistics

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--quick", action="store_true", help="tiny sizes: finishes in a few seconds")
args = parser.parse_args()
torch.manual_seed(0)
torch.set_default_dtype(torch.float64)
n, batch = (20, 16) if args.quick else (200, 256)


@deqdiff.register_solver("anderson1")
def anderson1(g, z0, *, tol, atol=0.0, max_iter=100, store_trajectory=False):
    """z ← g(z) − γ (g(z) − g(z_prev)), γ minimizing ‖F − γ ΔF‖ per row (F = g(z) − z)."""
    track = Tracker(z0, tol, atol, store_trajectory)
    z, g_prev, F_prev = z0, None, None
    for k in range(max_iter + 1):
        gz = g(z)
        F = gz - z
        # records iterate z, freezes the rows with ‖F‖ ≤ atol + tol·‖g(z)‖, returns the rest
        running = track.update(k, z, F.norm(dim=1), gz.norm(dim=1))
        if track.finished or k == max_iter:
            break
        if F_prev is None:
            z_next = gz  # the first step is a plain iteration
        else:
            dF = F - F_prev
            gamma = (F * dF).sum(1, keepdim=True) / (dF * dF).sum(1, keepdim=True).clamp_min(1e-300)
            z_next = gz - gamma * (gz - g_prev)
        z = torch.where(running[:, None], z_next, z)
        g_prev, F_prev = gz, F
    return track.result, track.info("anderson1", "forward")


def f(z, A, U, x):
    return torch.tanh(z @ A.T + x @ U.T)


# A symmetric with eigenvalues in [-0.98, 0]: plain iteration oscillates and contracts slowly
Q = torch.linalg.qr(torch.randn(n, n))[0]
A = ((Q * torch.linspace(-0.98, 0.0, n)) @ Q.T).requires_grad_()
U, x = torch.randn(n, 10) / 10**0.5, torch.randn(batch, 10)
z0 = torch.zeros(batch, n)

grads = {}
for solver in ("fixed_point", "anderson", "anderson1"):
    z, info = deqdiff.fixed_point(f, z0, A, U, x, solver=solver, tol=1e-10, max_iter=2000, return_info=True)
    (grads[solver],) = torch.autograd.grad(loss := (z ** 2).sum(), A)  # implicit: same for every solver
    print(f"{solver:12s} iterations: mean {info.forward.iterations.float().mean():5.1f}, "
          f"max {info.forward.max_iterations:4d}; "
          f"max relative residual {info.forward.rel_residual.max():.1e}, loss {loss.item():.10f}")

rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
print(f"dL/dA with anderson1 vs the built-in fixed_point: relative difference "
      f"{rel(grads['anderson1'], grads['fixed_point']):.1e}, "
      f"vs anderson: {rel(grads['anderson1'], grads['anderson']):.1e}")
# and second order: a Hessian-vector product of the loss through the custom solver
v = torch.randn_like(A)
hvps = []
for solver in ("anderson1", "fixed_point"):
    z = deqdiff.fixed_point(f, z0, A, U, x, solver=solver, tol=1e-10, max_iter=2000)
    (g,) = torch.autograd.grad((z ** 2).sum(), A, create_graph=True)
    hvps.append(torch.autograd.grad((g * v).sum(), A)[0])
print(f"Hessian-vector product d²L/dA² v, anderson1 vs fixed_point: relative difference {rel(*hvps):.1e}")
