"""The Hessian spectrum of a small trained DEQ's loss, split into its two curvature sources.

A DEQ z* = tanh(W z* + U x + b) with a head y = C z* + c is trained on scikit-learn digits; then
``deqdiff.derivatives.LossHessian`` gives Hessian-vector products of the cross-entropy w.r.t. all
weights, each by 2 implicit solves with (I − ∂f/∂z) at z* (Pacheco 2023, "Second derivative (and
further) of deep equilibrium/implicit models"), split as H = Gauss–Newton (loss curvature) +
dynamics curvature (+ head curvature); Lanczos finds both ends of each term's spectrum (cf.
Nguyen 2022, "An analysis of applying neural tangent kernels for deep equilibrium models").
One product is checked against ``torch.autograd.functional.hvp`` through unrolled iterations.

Run:  python examples/hessian_spectrum.py           (width 16, 400 digits, under a minute)
      python examples/hessian_spectrum.py --quick   (a smoke run in seconds)
"""
import argparse

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import deqdiff
from deqdiff.derivatives import LossHessian, lanczos

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--quick", action="store_true", help="tiny sizes: finishes in a few seconds")
args = parser.parse_args()
torch.manual_seed(0)
torch.set_default_dtype(torch.float64)  # float64: eigenvalues and the check to many digits
width, n_train, steps, lanczos_iters = (6, 40, 5, 6) if args.quick else (16, 400, 150, 40)

digits = load_digits()
X = torch.tensor(digits.data[:n_train]) / 16.0
y = torch.tensor(digits.target[:n_train])


def cell(z, W, U, b, x):  # the DEQ's map; z* = cell(z*, W, U, b, x)
    return torch.tanh(z @ W.T + x @ U.T + b)


head = lambda z, C, c: z @ C.T + c  # noqa: E731  (the linear classifier on z*)
loss = lambda logits: F.cross_entropy(logits, y)  # noqa: E731


W = 0.5 * torch.linalg.qr(torch.randn(width, width))[0]
U, b = torch.randn(width, 64) / 8, torch.zeros(width)
C, c = torch.randn(10, width) / width**0.5, torch.zeros(10)
params = [p.requires_grad_() for p in (W, U, b, C, c)]
opt = torch.optim.Adam(params, lr=1e-2)
z0 = torch.zeros(n_train, width)
for step in range(steps):
    train_loss = loss(head(deqdiff.fixed_point(cell, z0, W, U, b, X), C, c))
    opt.zero_grad()
    train_loss.backward()
    opt.step()
    with torch.no_grad():  # keep ‖W‖₂ ≤ 0.8: the map stays a contraction (tanh is 1-Lipschitz)
        W.mul_(0.8 / torch.linalg.matrix_norm(W, 2).clamp_min(0.8))
print(f"trained {steps} steps: loss {train_loss.item():.3f}, ‖W‖₂ = {torch.linalg.matrix_norm(W, 2).item():.2f}")

# the Hessian of θ = (W, U, b) and the head's φ = (C, c) at the converged z*
z = deqdiff.fixed_point(cell, z0, W, U, b, X, tol=1e-12, max_iter=500).detach()
H = LossHessian(cell, z, (W, U, b, X), loss, argnums=(0, 1, 2), head=head, head_params=(C, c))
print(f"{H.dim} parameters; Lanczos with {lanczos_iters} products (2 implicit solves each) per term")
for term in ("total", "gauss_newton", "dynamics", "head"):  # matrices: total = the other three
    T, _ = lanczos(lambda v: H.flat_vp(v, term), H.dim, lanczos_iters)  # tridiagonal Q H Qᵀ
    ritz = torch.linalg.eigvalsh(T)  # its eigenvalues approximate both ends of the spectrum
    print(f"  {term:13s} top-3 {[round(v, 4) for v in ritz.flip(0)[:3].tolist()]}, smallest {ritz[0].item():+.4f}")


def unrolled_loss(W, U, b, C, c, K=150):  # K plain iterations: a contraction ≤ 0.8, so 0.8^K → 0
    z = torch.zeros(n_train, width)
    for _ in range(K):
        z = cell(z, W, U, b, X)
    return loss(head(z, C, c))


v = [torch.randn_like(p) for p in params]  # check one product against the unrolled reference
ours = H.flatten(H.hvp(((v[0], v[1], v[2]), (v[3], v[4]))))
_, ref = torch.autograd.functional.hvp(unrolled_loss, tuple(p.detach() for p in params), tuple(v))
ref = torch.cat([r.reshape(-1) for r in ref])
print(f"H v vs torch.autograd.functional.hvp through 150 unrolled iterations: "
      f"relative difference {((ours - ref).norm() / ref.norm()).item():.1e}")
