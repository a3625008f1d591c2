"""Measured iteration counts on slowly contracting maps (ρ(J) ≈ 0.95, N = 64, tol 1e-8).

Expectations are mathematical: with a real spectrum (symmetric A) or a non-normal
Gaussian A, Krylov-type acceleration beats the rate ρ = 0.95 of Picard iteration by a
wide margin. With the spectrum spread on the circle |λ| = 0.95 (A = 0.95·orthogonal)
no polynomial of low degree is small on the spectrum, so limited-memory Anderson and
Broyden can only tie with Picard iteration there; only Newton–Krylov (outer steps,
each an inner GMRES solve costing about as many matvecs as Picard needs) wins.
Run with ``-s`` to see the counts.
"""

from __future__ import annotations

import pytest
import torch

from deqdiff.solvers import get_solver
from solver_problems import gen, orthogonal

N, S, TOL = 64, 3, 1e-8


def _problem(name: str):
    g_ = gen(0)
    Q = orthogonal(1, N, g_)[0]
    spectrum = torch.linspace(-0.95, 0.95, N, dtype=torch.float64)
    G = torch.randn(N, N, generator=g_, dtype=torch.float64)
    c = torch.randn(S, N, generator=g_, dtype=torch.float64)
    A = {
        "orthogonal": 0.95 * Q,
        "symmetric": Q @ torch.diag(spectrum) @ Q.T,
        "gaussian": 0.95 * G / torch.linalg.eigvals(G).abs().max(),
    }[name.removesuffix("_tanh")]
    if name.endswith("_tanh"):  # small offsets keep tanh near its linear regime: ρ(J) ≈ 0.95
        c = 0.1 * c
        return lambda z: torch.tanh(z @ A.T + c)
    return lambda z: z @ A.T + c


CASES = [  # (problem, acceleration expected for limited-memory Anderson/Broyden)
    ("symmetric", True),
    ("gaussian", True),
    ("symmetric_tanh", True),
    ("orthogonal", False),
    ("orthogonal_tanh", False),
]


@pytest.mark.parametrize("problem,expected", CASES)
def test_acceleration_on_slow_contraction(problem, expected):
    g = _problem(problem)
    counts, extra = {}, {}
    for name in ("fixed_point", "anderson", "broyden", "newton_krylov"):
        z, info = get_solver(name)(g, torch.zeros(S, N, dtype=torch.float64), tol=TOL, max_iter=2000)
        assert info.all_converged, info.summary()
        counts[name] = info.iterations
        extra[name] = info.extra
    print(
        f"\n{problem:>16}: " + ", ".join(f"{k} {v.tolist()}" for k, v in counts.items())
        + f" (newton_krylov inner matvecs {extra['newton_krylov']['inner_matvecs']})"
    )
    fp = counts["fixed_point"]
    assert bool((counts["newton_krylov"] < fp).all())
    for name in ("anderson", "broyden"):
        if expected:
            assert bool((counts[name] < 0.75 * fp).all()), (name, counts[name], fp)
        else:  # a tie: no worse than Picard by more than 10 %
            assert bool((counts[name] <= 1.1 * fp).all()), (name, counts[name], fp)
