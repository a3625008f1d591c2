"""The physics-informed DEQ pattern in plain PyTorch: Van der Pol from its ODE alone.

y(t) = C z*(t) + c with z* = tanh(A z* + B t + b) is trained so that y solves y1' = y2,
y2' = μ(1 − y1²) y2 − y1 (μ = 1, y(0) = (0, 0.1), t ∈ [0, 2]): the PIDEQ of Pacheco & Camponogara
2022, "Physics-informed DEQs (PIDEQ)". dy/dt is ``torch.autograd.grad(..., create_graph=True)``
through ``deqdiff.fixed_point`` — an implicit solve (Pacheco 2023, "Second derivative (and further)
of deep equilibrium/implicit models", eq. deq-jacobian) — and ``loss.backward()`` differentiates
the ODE residual w.r.t. the weights by more implicit solves (eq. hessian-t). A finite-difference
check runs first; scipy's solve_ivp checks the result.

Run:  python examples/physics_informed_by_hand.py          (800 Adam steps, about a minute)
      python examples/physics_informed_by_hand.py --quick  (a smoke run in seconds)
"""
import argparse

import torch
from scipy.integrate import solve_ivp

import deqdiff

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--quick", action="store_true", help="tiny sizes: finishes in a few seconds")
args = parser.parse_args()
torch.manual_seed(0)
torch.set_default_dtype(torch.float64)
n, steps, batch = (16, 20, 32) if args.quick else (32, 800, 256)
y0, mu, T = torch.tensor([0.0, 0.1]), 1.0, 2.0


def vdp(y):  # the right-hand side of the ODE, for torch (training) and numpy (solve_ivp)
    return [y[..., 1], mu * (1 - y[..., 0] ** 2) * y[..., 1] - y[..., 0]]


def f(z, A, B, b, t):  # every tensor z* depends on is an argument (no closures over weights)
    return torch.tanh(z @ A.T + t @ B.T + b)


A = (0.5 * torch.linalg.qr(torch.randn(n, n))[0]).requires_grad_()  # ‖A‖₂ = 0.5: a contraction
B, b = torch.randn(n, 1).requires_grad_(), torch.zeros(n, requires_grad=True)
C, c = (torch.randn(2, n) / n**0.5).requires_grad_(), torch.zeros(2, requires_grad=True)


def y_of(t, tol=1e-6):
    return deqdiff.fixed_point(f, torch.zeros(len(t), n), A, B, b, t, tol=tol) @ C.T + c


def y_and_dydt(t, tol=1e-6):
    y = y_of(t.requires_grad_(), tol)
    # rows are independent samples, so the gradient of a column's sum is its per-row dy/dt
    dydt = torch.cat([torch.autograd.grad(y[:, k].sum(), t, create_graph=True)[0] for k in range(2)], 1)
    return y, dydt


def loss_fn(t):
    y, dydt = y_and_dydt(t)
    return ((dydt - torch.stack(vdp(y), 1)) ** 2).mean() + ((y_of(torch.zeros(1, 1)) - y0) ** 2).sum()


# check once: dy/dt by the implicit solve vs central finite differences of the solved y(t)
t, h = torch.rand(5, 1) * T, 1e-5
_, dydt = y_and_dydt(t.clone(), tol=1e-13)
with torch.no_grad():
    fd = (y_of(t + h, tol=1e-13) - y_of(t - h, tol=1e-13)) / (2 * h)
print(f"dy/dt check: implicit vs finite differences, relative difference {((dydt - fd).norm() / fd.norm()):.1e}")

opt = torch.optim.Adam([A, B, b, C, c], lr=3e-3)
for step in range(steps + 1):
    loss = loss_fn(torch.rand(batch, 1) * T)  # fresh collocation points every step
    opt.zero_grad()
    loss.backward()  # through dy/dt: gradients of a derivative, by further implicit solves
    opt.step()
    with torch.no_grad():  # project A back to ‖A‖₂ ≤ 0.9 so that f stays a contraction
        A.mul_(0.9 / torch.linalg.matrix_norm(A, 2).clamp_min(0.9))
    if step % max(steps // 5, 1) == 0:
        print(f"step {step:5d}: physics loss {loss.item():.2e}")

t_eval = torch.linspace(0, T, 101)[:, None]
ref = solve_ivp(lambda t, y: vdp(y), (0, T), y0.numpy(), t_eval=t_eval[:, 0].numpy(), rtol=1e-10, atol=1e-12)
ref, y = torch.tensor(ref.y.T), y_of(t_eval).detach()
print(f"max |y - y_solve_ivp| on [0, {T:g}]: {(y - ref).abs().max():.2e} (|y| up to {ref.abs().max():.2f})")
