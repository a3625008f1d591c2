"""The engine's partial-derivative helpers: ``vjp`` and ``jvp_by_vjp`` take plain
``torch.autograd.grad`` where that is exact and ``torch.func`` elsewhere; both routes must give
the same partial derivatives (the other arguments held constant, even when they depend on the
primals through the caller's graph), first and second order."""

from __future__ import annotations

import pytest
import torch

from deqdiff.engine.functional import jvp_by_vjp, live_tangents, partial_in, vjp


def _problem():
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(4, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    z = torch.tanh(x @ W.T)  # depends on both primals through the caller's graph
    f = lambda z, W, x: torch.tanh(z @ W.T + x) * z.sum(1, keepdim=True)  # noqa: E731
    return f, z, W, x, gen


def _functorch_vjp(f, args, idx, u):
    return torch.func.vjp(partial_in(f, args, idx), *(args[i] for i in idx))[1](u)


@pytest.mark.parametrize("grad_mode", [False, True])
def test_vjp_holds_the_other_arguments_constant_in_both_routes(grad_mode):
    f, z, W, x, gen = _problem()
    u = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    with torch.set_grad_enabled(grad_mode):
        got = vjp(f, (z, W, x), [1, 2], u)
        ref = _functorch_vjp(f, (z, W, x), [1, 2], u)
    for g, r in zip(got, ref):
        assert torch.allclose(g, r, rtol=1e-13, atol=1e-13)
        assert g.requires_grad == grad_mode
    if grad_mode:  # second order: the result stays differentiable in every argument
        a = torch.autograd.grad(got[0].sum(), (W, x), retain_graph=True)
        b = torch.autograd.grad(ref[0].sum(), (W, x), retain_graph=True)
        for p, q in zip(a, b):
            assert torch.allclose(p, q, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("leaves", [False, True])
def test_jvp_by_vjp_equals_forward_mode(leaves):
    f, z, W, x, gen = _problem()
    if leaves:  # arguments without history: the plain route also serves under grad mode
        z = z.detach()
    t = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    got = jvp_by_vjp(f, (z, W, x), [2], [t])
    ref = torch.func.jvp(lambda xx: f(z.detach(), W.detach(), xx), (x.detach(),), (t,))[1]
    assert torch.allclose(got, ref, rtol=1e-13, atol=1e-13)
    a = torch.autograd.grad(got.sum(), W, retain_graph=True)[0]
    out, pull = torch.func.vjp(partial_in(f, (z, W, x), [2]), x)  # the torch.func route
    b = torch.autograd.grad(torch.func.vjp(pull, torch.zeros_like(out))[1]((t,))[0].sum(), W)[0]
    assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        assert torch.allclose(jvp_by_vjp(f, (z, W, x), [2], [t]), ref, rtol=1e-13, atol=1e-13)


def test_vjp_of_an_unused_argument_is_zero():
    f, z, W, x, gen = _problem()
    g = vjp(lambda z, W, x: z * 2.0, (z, W, x), [1], torch.ones(3, 4, dtype=torch.float64))
    assert torch.equal(g[0], torch.zeros_like(W))


def test_live_tangents_drops_the_zeros_torch_func_jvp_adds_and_keeps_the_rest():
    seen = []

    def rule_inputs(a, b):  # what a jvp rule sees: torch.func's tangents of both inputs
        class Spy(torch.autograd.Function):
            generate_vmap_rule = True

            @staticmethod
            def forward(a, b):
                return a * b

            @staticmethod
            def setup_context(ctx, inputs, output):
                ctx.save_for_forward(*inputs)

            @staticmethod
            def jvp(ctx, a_dot, b_dot):
                seen.append(live_tangents([a_dot, b_dot]))
                a, b = ctx.saved_tensors
                return a_dot * b + a * b_dot

        return Spy.apply(a, b)

    a, b = torch.ones(3), torch.full((3,), 2.0)
    torch.func.jvp(lambda a: rule_inputs(a, b), (a,), (torch.ones(3),))
    assert seen[-1][0] is not None and seen[-1][1] is None  # b's zero tangent is dropped
    torch.func.jvp(lambda a: rule_inputs(a, b), (a,), (torch.zeros(3),))
    assert seen[-1] == [None, None]  # an untracked zero is no tangent either
    # a zero tangent that is differentiated (its derivative is asked for) stays
    torch.func.grad(lambda v: torch.func.jvp(lambda a: rule_inputs(a, b), (a,), (v,))[1].sum())(torch.zeros(3))
    assert seen[-1][0] is not None
    v = torch.zeros(3, requires_grad=True)
    assert live_tangents([v, None, torch.zeros(2), torch.ones(2)])[0] is v
    assert live_tangents([torch.zeros(2), torch.ones(2)])[0] is None
    # batched tangents (vmap) are kept whatever their values
    torch.func.vmap(lambda v: torch.func.jvp(lambda a: rule_inputs(a, b), (a,), (v,))[1])(torch.zeros(2, 3))
    assert seen[-1][0] is not None
