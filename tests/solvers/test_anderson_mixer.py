"""Anderson's ``mixer`` hook: externally supplied weights and mixing run the same loop."""

from __future__ import annotations

import torch

from deqdiff.solvers.anderson import anderson

from tests.conftest import contractive_matrix


def _problem(S=6, n=12, seed=0, row=None):
    gen = torch.Generator().manual_seed(seed)
    A = contractive_matrix(n, 0.9, gen)
    c = torch.randn(S, n, generator=gen)
    if row is not None:
        c = c[row:row + 1]
    return (lambda z: torch.tanh(z @ A.T + c)), torch.zeros(c.shape[0], n)


def test_identity_mixer_reproduces_anderson_bit_for_bit():
    g, z0 = _problem()
    calls = []

    def mixer(k, F, res, dF, gram, rhs, gamma, rows, newest):
        calls.append((k, dF.shape[1]))
        return gamma, torch.ones_like(res)

    ref, info_ref = anderson(g, z0, tol=1e-10, max_iter=60, m=4)
    out, info = anderson(g, z0, tol=1e-10, max_iter=60, m=4, mixer=mixer)
    assert torch.equal(out, ref) and torch.equal(info.iterations, info_ref.iterations)
    assert calls[0] == (0, 0) and calls[1] == (1, 1) and max(c[1] for c in calls) == 4


def test_mixer_beta_per_row_equals_anderson_with_that_beta():
    g, z0 = _problem()
    betas = torch.tensor([0.3, 0.5, 0.7, 0.9, 1.0, 0.6])

    def mixer(k, F, res, dF, gram, rhs, gamma, rows, newest):
        return gamma, betas if rows is None else betas[rows]

    out, info = anderson(g, z0, tol=1e-12, atol=0.0, max_iter=30, m=3, restart=None, mixer=mixer)
    for s, b in enumerate(betas.tolist()):
        g1, z1 = _problem(row=s)
        ref, _ = anderson(g1, z1, tol=1e-12, max_iter=30, m=3, beta=b, restart=None)
        torch.testing.assert_close(out[s:s + 1], ref, rtol=1e-9, atol=1e-12)


def test_mixer_weights_replace_the_least_squares_weights():
    g, z0 = _problem()
    # zero weights: every step is the plain mixing step z + βF, i.e. damped Picard iteration
    def mixer(k, F, res, dF, gram, rhs, gamma, rows, newest):
        return torch.zeros_like(gamma), torch.full_like(res, 0.8)

    out, info = anderson(g, z0, tol=0.0, max_iter=7, m=3, mixer=mixer)
    z = z0
    for _ in range(7):
        z = z + 0.8 * (g(z) - z)
    torch.testing.assert_close(out, z, rtol=1e-12, atol=1e-12)
