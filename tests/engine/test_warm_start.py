"""Warm starts: the previous call's z* and derivative solutions as starting points change the
iteration counts, never the derivatives (beyond tolerance)."""

from __future__ import annotations

import sys

import pytest
import torch

import deqdiff
from tests.conftest import contractive_matrix

S, n = 8, 70  # rows wider than 64: the derivative solves are iterative, so a start matters


def problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    A = contractive_matrix(n, 0.9, g).requires_grad_()
    x = torch.randn(S, n, generator=g).requires_grad_()
    return A, x


def f(z, A, x):
    return torch.tanh(z @ A.T + x)


def second_order(A, x, **kw):
    z, info = deqdiff.fixed_point(f, torch.zeros(S, n), A, x, tol=1e-10, return_info=True, **kw)
    (gx,) = torch.autograd.grad(z.pow(2).sum(), x, create_graph=True)
    (gA,) = torch.autograd.grad(gx.pow(2).sum(), A)
    return gA, info


def test_warm_start_keeps_derivatives_and_cuts_iterations():
    A, x = problem()
    ws = deqdiff.WarmStart()
    g_cold, info_cold = second_order(A, x, warm_start=ws)  # first call: cold, fills ws
    with torch.no_grad():
        A.add_(1e-4 * torch.randn(n, n, generator=torch.Generator().manual_seed(5)))  # a training step
    g_ref, info_ref = second_order(A, x)
    g_warm, info_warm = second_order(A, x, warm_start=ws)
    assert float((g_warm - g_ref).norm() / g_ref.norm()) < 1e-8
    assert info_warm.forward.iterations.sum() < info_ref.forward.iterations.sum()
    warm_iters = sum(int(d.iterations.sum()) for d in info_warm.derivatives)
    cold_iters = sum(int(d.iterations.sum()) for d in info_ref.derivatives)
    assert len(info_warm.derivatives) == len(info_ref.derivatives) == 3
    assert warm_iters < cold_iters


def test_warm_start_ignores_mismatched_shapes_and_resets():
    A, x = problem()
    ws = deqdiff.WarmStart()
    second_order(A, x, warm_start=ws)
    x_small = x[:3].detach().requires_grad_()
    z = deqdiff.fixed_point(f, torch.zeros(3, n), A, x_small, tol=1e-10, warm_start=ws)  # another batch: cold
    ref = deqdiff.fixed_point(f, torch.zeros(3, n), A, x_small, tol=1e-10)
    assert torch.allclose(z, ref, atol=1e-9)
    ws.reset()
    assert ws.z is None and not ws.solutions


def test_warm_start_through_the_deq_layer():
    class Cell(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(n, n)
            with torch.no_grad():
                self.lin.weight.copy_(contractive_matrix(n, 0.8, torch.Generator().manual_seed(2)))

        def forward(self, z, x):
            return torch.tanh(self.lin(z) + x)

    ws = deqdiff.WarmStart()
    deq = deqdiff.DEQ(Cell(), tol=1e-9, warm_start=ws)
    x = torch.randn(S, n)
    deq(x)
    deq(x)
    assert int(deq.last_info.forward.max_iterations) == 0  # started at z*


def test_warm_start_must_be_a_warm_start_object():
    A, x = problem()
    with pytest.raises(TypeError, match="WarmStart"):
        deqdiff.fixed_point(f, torch.zeros(S, n), A, x, warm_start={})


def test_extrapolated_start_follows_a_steady_path_and_keeps_derivatives():
    """Along a path A_k = A + k·D (steps that move alike), the start 2 z*_{k-1} − z*_{k-2} is
    second-order accurate, so the forward solve needs fewer iterations than from z*_{k-1};
    the derivatives are those of a cold solve either way."""
    A0, x = problem()
    D = 2e-3 * torch.randn(n, n, generator=torch.Generator().manual_seed(7))
    runs = {}
    for extrapolate in (False, True):
        ws = deqdiff.WarmStart(extrapolate=extrapolate)
        for k in range(3):
            A = (A0 + k * D).detach().requires_grad_()
            g, info = second_order(A, x, warm_start=ws)
        runs[extrapolate] = (g, info)
    g_ref, _ = second_order(A, x)
    for g, _ in runs.values():
        assert float((g - g_ref).norm() / g_ref.norm()) < 1e-8
    assert runs[True][1].forward.iterations.sum() < runs[False][1].forward.iterations.sum()


def test_structure_is_probed_once_per_warm_start(monkeypatch):
    from deqdiff.engine import structure

    calls = []
    real = structure.infer_rows

    def counting(*args, **kw):
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(sys.modules["deqdiff.engine.fixed_point"], "infer_rows", counting)
    A, x = problem()
    ws = deqdiff.WarmStart()
    for _ in range(3):
        deqdiff.fixed_point(f, torch.zeros(S, n), A, x, tol=1e-8, warm_start=ws)
    assert len(calls) == 1
    deqdiff.fixed_point(f, torch.zeros(S, n), A, x, tol=1e-8)  # no warm start: probed again
    assert len(calls) == 2
