"""Shared test problems and the test-only dense operator for the solver tests (float64)."""

from __future__ import annotations

import torch
from torch import nn

from tests.conftest import contractive_matrix

FORWARD = ["fixed_point", "anderson", "broyden", "newton_krylov"]
LINEAR = ["richardson", "anderson", "gmres", "bicgstab", "dense"]


def rowmv(A: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A_s v_s per row, as a product and a sum over the last axis (not bmm, whose batched
    and single-row kernels round differently for N ≳ 20): bit-identical in a batch and alone."""
    return (A * v.unsqueeze(1)).sum(2)


class DenseOp:
    """Test-only linear operator holding explicit per-row matrices (S, N, N)."""

    def __init__(self, A: torch.Tensor):
        self.A = A
        self.mv_calls = 0

    def mv(self, v: torch.Tensor) -> torch.Tensor:
        self.mv_calls += 1
        return rowmv(self.A, v)

    def dense_solve(self, b: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve(self.A, b)

    def row(self, i: int) -> "DenseOp":
        return DenseOp(self.A[i : i + 1])


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def orthogonal(S: int, N: int, g: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(S, N, N, generator=g, dtype=dtype))
    return q * torch.sign(r.diagonal(dim1=1, dim2=2)).unsqueeze(1)


def with_norm(S: int, N: int, norm, g: torch.Generator, dtype=torch.float64) -> torch.Tensor:
    """Random (S, N, N) matrices with spectral norm ``norm`` (scalar or (S,))."""
    M = torch.randn(S, N, N, generator=g, dtype=dtype)
    M = M / torch.linalg.matrix_norm(M, ord=2)[:, None, None]
    return M * torch.as_tensor(norm, dtype=dtype).reshape(-1, 1, 1)


def affine_problem(S: int, N: int, norms, seed: int = 0):
    """g(z) = A_s z + c_s per row with ‖A_s‖ = norms[s]; returns (g, z_star, A, c)."""
    g = gen(seed)
    A = with_norm(S, N, norms, g)
    c = torch.randn(S, N, generator=g, dtype=torch.float64)
    I = torch.eye(N, dtype=torch.float64)
    z_star = torch.linalg.solve(I - A, c)
    return (lambda z: rowmv(A, z) + c), z_star, A, c


def tanh_problem(S: int, N: int, norms, seed: int = 0):
    """g(z) = tanh(A_s z + x_s) with ‖A_s‖ = norms[s]; returns (g, A, x)."""
    g = gen(seed)
    A = with_norm(S, N, norms, g)
    x = torch.randn(S, N, generator=g, dtype=torch.float64)
    return (lambda z: torch.tanh(rowmv(A, z) + x)), A, x


def make_map(kind: str, A: torch.Tensor, c: torch.Tensor):
    """Row-wise map ``A_s z + c_s`` (kind "affine") or ``tanh(A_s z + c_s)`` ("tanh")."""
    if kind == "affine":
        return lambda z: rowmv(A, z) + c
    return lambda z: torch.tanh(rowmv(A, z) + c)


# --- the neural-solver tests' DEQ cell ------------------------------------------------------

NEURAL_N, NEURAL_D = 8, 3


class NeuralTanhCell(nn.Module):
    """f(z, x) = tanh(A z + U x + b) with ‖A‖₂ = 0.9 (slow enough that acceleration matters): the
    neural-solver tests' cell, on N = 8 states and D = 3 inputs."""

    def __init__(self, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.A = nn.Parameter(contractive_matrix(NEURAL_N, 0.9, gen))
        self.U = nn.Parameter(torch.randn(NEURAL_N, NEURAL_D, generator=gen))
        self.b = nn.Parameter(0.1 * torch.randn(NEURAL_N, generator=gen))

    def forward(self, z, x):
        return torch.tanh(z @ self.A.T + x @ self.U.T + self.b)


def neural_inputs(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, NEURAL_D, generator=torch.Generator().manual_seed(seed))


def neural_zeros(x: torch.Tensor) -> torch.Tensor:
    """The zero start of :class:`NeuralTanhCell`'s state for inputs ``x``."""
    return x.new_zeros(x.shape[0], NEURAL_N)
