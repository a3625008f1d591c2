"""Small models for the analysis tests (float64 by the suite's default dtype)."""

from __future__ import annotations

import torch
from torch import nn

import deqdiff


class TanhCell(nn.Module):
    """f(z, x) = tanh(W z + U x + b) with ‖W‖₂ = rho (a contraction)."""

    def __init__(self, n: int, d: int, rho: float = 0.5):
        super().__init__()
        self.W = nn.Linear(n, n, bias=False)
        self.U = nn.Linear(d, n)
        with torch.no_grad():
            self.W.weight.mul_(rho / torch.linalg.matrix_norm(self.W.weight, 2))
        self.n = n

    def forward(self, z, x):
        return torch.tanh(self.W(z) + self.U(x))

    def init_state(self, x):
        return x.new_zeros(x.shape[0], self.n)


class FCNet(nn.Module):
    """x → z* = tanh(W z* + U x + b) → linear head; follows the DEQ model protocol."""

    def __init__(self, d=5, n=6, c=3, rho=0.5, **solver_options):
        super().__init__()
        opts = dict(tol=1e-12, max_iter=300)
        opts.update(solver_options)
        self.deq = deqdiff.DEQ(TanhCell(n, d, rho), **opts)
        self.head = nn.Linear(n, c)

    def forward(self, x, **overrides):
        return self.head(self.deq(x, **overrides))


class MonCell(nn.Module):
    """Forward-backward splitting map of a monotone DEQ (Nguyen 2022 eq. 3.5):
    f(z, x) = relu(z − α((I − W) z − U x)),  W = (1 − m) I − AᵀA + B − Bᵀ."""

    def __init__(self, n: int, d: int, m: float = 1.0, alpha: float = 0.5, scale: float = 0.3):
        super().__init__()
        self.A = nn.Parameter(scale * torch.randn(n, n) / n**0.5)
        self.B = nn.Parameter(scale * torch.randn(n, n) / n**0.5)
        self.U = nn.Parameter(torch.randn(n, d) / d**0.5)
        self.m, self.alpha, self.n = m, alpha, n

    def W(self):
        eye = torch.eye(self.n, dtype=self.A.dtype)
        return (1 - self.m) * eye - self.A.T @ self.A + self.B - self.B.T

    def forward(self, z, x):
        IW = torch.eye(self.n, dtype=z.dtype) - self.W()
        return torch.relu(z - self.alpha * (z @ IW.T - x @ self.U.T))

    def init_state(self, x):
        return x.new_zeros(x.shape[0], self.n)


class MonNet(nn.Module):
    """Scalar-output monotone DEQ ŷ = uᵀz* (Nguyen 2022 Definition 3.2.1)."""

    def __init__(self, d=4, n=12, m=1.0, alpha=0.5):
        super().__init__()
        self.deq = deqdiff.DEQ(MonCell(n, d, m, alpha), solver="anderson", tol=1e-12, max_iter=500)
        self.u = nn.Linear(n, 1, bias=False)

    def forward(self, x, **overrides):
        return self.u(self.deq(x, **overrides)).squeeze(-1)

    def parts(self):
        c = self.deq.cell
        return {"A": c.A, "B": c.B, "U": c.U, "u": self.u.weight.reshape(-1)}
