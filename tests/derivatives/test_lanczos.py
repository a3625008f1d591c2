"""Item 5: Hessian spectrum by Lanczos (full reorthogonalization, seeded) against
torch.linalg.eigvalsh of the dense matrices."""

from __future__ import annotations

import pytest
import torch

from deqdiff.derivatives import LossHessian, eigsh, hessian_eigenvalues, lanczos
from tests.conftest import make_problem, rel_err, tanh_cell
from tests.derivatives.helpers import solve


@pytest.fixture(scope="module")
def hess():
    gen = torch.Generator().manual_seed(11)
    z0, p = make_problem(gen, batch=8)
    A, B, x, b = (q.detach() for q in p)
    W = torch.randn(3, 5, generator=gen)
    y = torch.randn(8, 3, generator=gen)
    z = solve(tanh_cell, z0, (A, B, x, b), batch_ndim=1)
    loss = lambda z: ((z @ W.T - y) ** 2).sum() + (z**3).sum()
    return LossHessian(tanh_cell, z, (A, B, x, b), loss, argnums=(0, 3), batch_ndim=1)


@pytest.mark.parametrize("term", ["total", "gauss_newton", "dynamics"])
def test_top_and_bottom_k_match_eigvalsh(hess, term):
    ev = torch.linalg.eigvalsh(hess.dense(term))
    scale = ev.abs().max()
    top = hessian_eigenvalues(hess, 3, "largest", term, num_iters=hess.dim)
    bot = hessian_eigenvalues(hess, 3, "smallest", term, num_iters=hess.dim)
    assert ((top - ev.flip(0)[:3]).abs().max() / scale) < 1e-10
    assert ((bot - ev[:3]).abs().max() / scale) < 1e-10
    # fewer iterations than dim still resolve the extreme eigenvalues
    top_short = hessian_eigenvalues(hess, 2, "largest", term, num_iters=24)
    assert ((top_short - ev.flip(0)[:2]).abs().max() / scale) < 1e-8


def test_deterministic_and_eigenvectors(hess):
    a = hessian_eigenvalues(hess, 2, num_iters=20, seed=5)
    b = hessian_eigenvalues(hess, 2, num_iters=20, seed=5)
    assert torch.equal(a, b)
    vals, vecs = hessian_eigenvalues(hess, 2, num_iters=hess.dim, return_eigenvectors=True)
    H = hess.dense()
    for lam, v in zip(vals, vecs):
        assert rel_err(H @ v, lam * v) < 1e-9


def test_lanczos_on_matrix_with_repeated_eigenvalues():
    """Breakdown (an invariant subspace) restarts orthogonally; the spectrum stays exact."""
    gen = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(12, 12, generator=gen))
    ev = torch.tensor([5.0, 5.0, 5.0, 2.0, 2.0, 1.0, 0.0, 0.0, -1.0, -1.0, -3.0, -3.0])
    M = Q @ torch.diag(ev) @ Q.T
    T, V = lanczos(lambda v: M @ v, 12, 12, seed=1)
    assert rel_err(V @ V.T, torch.eye(12)) < 1e-12
    assert rel_err(torch.linalg.eigvalsh(T), ev.sort().values) < 1e-12
    assert rel_err(eigsh(lambda v: M @ v, 12, 2, "smallest", num_iters=12), torch.tensor([-3.0, -3.0])) < 1e-12
