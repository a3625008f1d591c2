"""DEQ-Transformer (Bai, Kolter & Koltun 2019): the cell against a hand computation, causality,
batch independence, and implicit derivatives of every order against the weight-tied unrolled
network of the same parameters (float64, strongly contractive tiny configuration)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from deqdiff.analysis import empirical_ntk
from deqdiff.analysis.hessian import deq_loss_hessian, hessian_spectrum
from deqdiff.models.transformer import (DEQTransformerLM, TransformerCell, UnrolledTransformerLM, causal_attention,
                                        unrolled_from_deq)
from tests.conftest import rel_err

V = 5  # vocabulary
TINY = dict(d_model=4, n_heads=2, d_ff=6, max_len=4, init_std=0.15)


def tiny_deq(**kw) -> DEQTransformerLM:
    """Seeded; the global RNG state is left as it was."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = DEQTransformerLM(V, **TINY, **{"tol": 1e-12, "max_iter": 200, "on_fail": "raise", **kw})
        for norm in (model.cell.norm1, model.cell.norm2, model.norm):  # non-trivial affine parameters
            torch.nn.init.normal_(norm.weight, 1.0, 0.1)
            torch.nn.init.normal_(norm.bias, 0.0, 0.1)
    return model.double()


def tokens(b=2, t=4, seed=1):
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


def ce(logits, y):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def test_cell_matches_a_hand_computation_one_head_d2():
    cell = TransformerCell(2, 1, 3).double()
    with torch.no_grad():
        cell.qkv.weight.copy_(torch.tensor([[1., 0], [0, 1], [1, 1], [0, 1], [1, -1], [2, 0]]))
        cell.qkv.bias.copy_(torch.tensor([0.1, 0, 0, 0.2, 0, -0.1]))
        cell.out.weight.copy_(torch.tensor([[0.5, 0], [0.3, -0.2]]))
        cell.out.bias.copy_(torch.tensor([0.0, 0.1]))
        cell.ff1.weight.copy_(torch.tensor([[1., 0], [0, 1], [1, -1]]))
        cell.ff1.bias.copy_(torch.tensor([0.0, -0.5, 0.2]))
        cell.ff2.weight.copy_(torch.tensor([[0.5, 0, 1], [0, -1, 0.3]]))
        cell.ff2.bias.copy_(torch.tensor([0.1, 0.0]))
        cell.norm1.weight.copy_(torch.tensor([1.5, 0.5]))
        cell.norm1.bias.copy_(torch.tensor([0.0, 0.2]))
    z = [[0.3, -0.1], [0.2, 0.4], [-0.5, 0.1]]
    x = [[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]]

    def mv(W, b, v):
        return [sum(W[i][j] * v[j] for j in range(len(v))) + b[i] for i in range(len(W))]

    def ln(v, g, b, eps=1e-5):
        m = sum(v) / len(v)
        var = sum((a - m) ** 2 for a in v) / len(v)
        return [g[i] * (v[i] - m) / math.sqrt(var + eps) + b[i] for i in range(len(v))]

    P = {n: p.tolist() for n, p in cell.named_parameters()}
    u = [[z[t][i] + x[t][i] for i in range(2)] for t in range(3)]
    qkv = [mv(P["qkv.weight"], P["qkv.bias"], u[t]) for t in range(3)]
    q, k, v = [r[0:2] for r in qkv], [r[2:4] for r in qkv], [r[4:6] for r in qkv]
    ref = []
    for t in range(3):
        s = [sum(q[t][i] * k[j][i] for i in range(2)) / math.sqrt(2) for j in range(t + 1)]  # positions ≤ t only
        w = [math.exp(a) / sum(math.exp(b) for b in s) for a in s]
        head = [sum(w[j] * v[j][i] for j in range(t + 1)) for i in range(2)]
        a = mv(P["out.weight"], P["out.bias"], head)
        h = ln([x[t][i] + a[i] for i in range(2)], P["norm1.weight"], P["norm1.bias"])
        hid = [max(r, 0.0) for r in mv(P["ff1.weight"], P["ff1.bias"], h)]
        ff = mv(P["ff2.weight"], P["ff2.bias"], hid)
        ref.append(ln([h[i] + ff[i] for i in range(2)], P["norm2.weight"], P["norm2.bias"]))
    out = cell(torch.tensor([z]), torch.tensor([x]))
    assert torch.allclose(out, torch.tensor([ref]), atol=1e-12)


def _masked_softmax_attention(q, k, v):
    """out[t] = Σ_{s ≤ t} softmax_s(q_t·k_s/√d) v_s, one position at a time."""
    out = torch.zeros_like(q)
    for t in range(q.shape[-2]):
        w = torch.softmax(q[..., t:t + 1, :] @ k[..., : t + 1, :].transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        out[..., t, :] = (w @ v[..., : t + 1, :])[..., 0, :]
    return out


def test_causal_attention_equals_the_masked_softmax_formula_on_both_paths():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, generator=g) for _ in range(3))
    ref = _masked_softmax_attention(q, k, v)
    # differentiable inputs: plain operations, with a graph (double backward, forward AD, vmap)
    q.requires_grad_()
    recorded = causal_attention(q, k, v)
    assert torch.allclose(recorded, ref, atol=1e-12)
    second = []
    for out in (recorded, _masked_softmax_attention(q, k, v)):
        (g1,) = torch.autograd.grad((out ** 2).sum(), q, create_graph=True)
        second.append(torch.autograd.grad(g1.pow(2).sum(), q)[0])
    assert torch.allclose(second[0], second[1], atol=1e-10)
    q = q.detach()
    # nothing to differentiate: the fused kernel (no T × T temporaries), the same values
    with torch.no_grad():
        fused = causal_attention(q, k, v)
    assert torch.allclose(fused, ref, atol=1e-12)


def test_forward_ad_and_vmap_under_no_grad_take_the_differentiable_path():
    g = torch.Generator().manual_seed(1)
    q, k, v, dq = (torch.randn(2, 4, 3, generator=g) for _ in range(4))
    with torch.no_grad():
        _, tangent = torch.func.jvp(lambda a: causal_attention(a, k, v), (q,), (dq,))
        batched = torch.func.vmap(causal_attention)(q, k, v)
    _, ref_tangent = torch.func.jvp(lambda a: _masked_softmax_attention(a, k, v), (q,), (dq,))
    assert torch.allclose(tangent, ref_tangent, atol=1e-12)
    assert torch.allclose(batched, _masked_softmax_attention(q, k, v), atol=1e-12)


def test_deq_training_step_holds_less_tensor_memory_than_two_unrolled_layers():
    """The implicit backward holds one vjp graph of the cell at a time and the forward iterations
    no T × T attention temporaries, so a DEQ step's peak live tensor memory stays below that of
    the same cell unrolled twice (it held the linearization's and the parameters' vjp graphs
    together before: 0.60 vs 0.50 MiB here; now 0.45)."""
    from deqdiff.training.memtrace import TensorMemory

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = DEQTransformerLM(11, d_model=32, n_heads=2, d_ff=64, max_len=32, init_std=0.1).float()
        toks = torch.randint(0, 11, (4, 33))
    peaks = {}
    for name, net in (("deq", model), ("unrolled-2", unrolled_from_deq(model, 2))):
        def step():
            loss = ce(net(toks[:, :-1]), toks[:, 1:])
            loss.backward()
            net.zero_grad(set_to_none=True)
        step()  # warm-up
        with TensorMemory() as mem:
            step()
        peaks[name] = mem.peak
    assert model.deq.last_info.forward.max_iterations >= 3  # a genuine solve, not one step
    assert peaks["deq"] < peaks["unrolled-2"], peaks


def test_recomputed_linearization_lowers_the_backward_solve_peak_with_the_same_gradient(monkeypatch):
    """``recompute_linearization=True`` (the ``deqdiff lm`` default): the backward solve holds no
    vjp graph of the cell, each iteration evaluates it again and frees its graph as the pass
    runs; same gradients (float32 rounding), lower peak live tensor memory inside the solve."""
    import importlib

    from deqdiff.training.memtrace import TensorMemory

    fp = importlib.import_module("deqdiff.engine.fixed_point")  # the module (the package exports the function)
    mem = TensorMemory()
    solve_peaks = []
    original = fp.solve_with_operator

    def marked(*args, **kw):  # the peak of the implicit backward solve alone
        outer, start = mem.peak, mem.current
        mem.peak = start
        try:
            return original(*args, **kw)
        finally:
            solve_peaks.append(mem.peak - start)
            mem.peak = max(outer, mem.peak)

    monkeypatch.setattr(fp, "solve_with_operator", marked)
    grads = {}
    toks = torch.randint(0, 11, (8, 33), generator=torch.Generator().manual_seed(0))
    for recompute in (False, True):
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = DEQTransformerLM(11, d_model=32, n_heads=2, d_ff=64, max_len=32, init_std=0.1,
                                     recompute_linearization=recompute).float()
        solve_peaks.clear()
        with mem:
            ce(model(toks[:, :-1]), toks[:, 1:]).backward()
        assert len(solve_peaks) == 1 and model.deq.last_info.derivatives[0].iterations.max() >= 3
        grads[recompute] = (torch.cat([p.grad.reshape(-1) for p in model.parameters()]), solve_peaks[0])
    assert rel_err(grads[True][0], grads[False][0]) < 1e-5
    assert grads[True][1] < 0.95 * grads[False][1], (grads[True][1], grads[False][1])  # 0.89 measured


def test_shapes_and_tied_head():
    model = tiny_deq()
    y = tokens(3, 4)
    assert model(y).shape == (3, 4, V)
    assert model.tied and model.head is None
    unrolled = UnrolledTransformerLM(V, depth=3, **TINY).double()
    assert unrolled(y).shape == (3, 4, V) and unrolled.depth == 3
    separate = DEQTransformerLM(V, **TINY, tie_weights=False)
    assert separate.head.weight.shape == (V, 4)
    with pytest.raises(ValueError, match="max_len"):
        model(tokens(1, 5))
    with pytest.raises(ValueError, match="divisible"):
        TransformerCell(6, 4, 8)


def test_cell_is_exactly_causal():
    """∂f(z, x)[t]/∂(z, x)[s] = 0 for s > t, read off the exact Jacobian."""
    cell = tiny_deq().cell
    g = torch.Generator().manual_seed(2)
    z, x = torch.randn(1, 4, 4, generator=g), torch.randn(1, 4, 4, generator=g)
    Jz, Jx = torch.autograd.functional.jacobian(cell, (z, x))  # (1, T, d, 1, T, d)
    for J in (Jz, Jx):
        J = J[0, :, :, 0].permute(0, 2, 1, 3)  # (t, s, d, d)
        future = torch.ones(4, 4, dtype=torch.bool).triu(1)
        assert J[future].abs().max() == 0
        assert J[~future].abs().max() > 0


def test_equilibrium_is_causal_and_batch_independent():
    model = tiny_deq()
    y = tokens(3, 4)
    changed = y.clone()
    changed[:, -1] = (changed[:, -1] + 1) % V
    a, b = model(y), model(changed)
    assert (a[:, :-1] - b[:, :-1]).abs().max() < 1e-10  # future tokens do not move earlier outputs
    assert (a[:, -1] - b[:, -1]).abs().max() > 1e-3
    alone = torch.cat([model(y[i:i + 1]) for i in range(3)])
    assert (alone - a).abs().max() < 1e-10
    assert model.deq.last_info.forward.all_converged


def test_unrolled_equals_deq_at_convergence_and_shares_parameters():
    model = tiny_deq()
    unrolled = unrolled_from_deq(model, 80)
    assert {id(p) for p in unrolled.parameters()} == {id(p) for p in model.parameters()}
    y = tokens()
    assert rel_err(model(y), unrolled(y)) < 1e-11


def test_gradcheck_and_gradgradcheck_injection_and_a_cell_weight():
    model = tiny_deq()
    x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(3), requires_grad=True)
    w = model.cell.ff1.weight.detach().clone().requires_grad_()
    b = model.cell.qkv.bias.detach().clone().requires_grad_()

    def fn(x, w):
        return functional_call(model.deq, {"cell.ff1.weight": w}, (x,))

    def fb(b):
        return functional_call(model.deq, {"cell.qkv.bias": b}, (x.detach()[:1],))

    assert torch.autograd.gradcheck(fn, (x, w), eps=1e-6, atol=1e-6, fast_mode=True)
    assert torch.autograd.gradgradcheck(fb, (b,), eps=1e-6, atol=1e-5, fast_mode=True)


@pytest.mark.parametrize("recompute", [False, True])
def test_first_and_second_order_gradients_equal_unrolled(recompute):
    model = tiny_deq(recompute_linearization=recompute)
    unrolled = unrolled_from_deq(model, 80)
    y = tokens()
    params = [p for n, p in model.named_parameters() if n.startswith("core.")]
    x = model.embed(y).detach().requires_grad_()

    def derivatives(core):
        z = core(x)
        loss = ce(F.linear(model.norm(z), model.embed.token.weight, model.head_bias), y)
        grads = torch.autograd.grad(loss, [x, *params], create_graph=True)
        second = torch.autograd.grad(sum(g.square().sum() for g in grads), params)
        return grads + second

    for a, b in zip(derivatives(model.core), derivatives(unrolled.core)):
        assert rel_err(a, b) < 1e-8


@pytest.mark.parametrize("solver", ["anderson", "broyden", "fixed_point", "newton_krylov"])
def test_every_forward_solver_gives_the_unrolled_gradient(solver):
    model = tiny_deq(solver=solver)
    unrolled = unrolled_from_deq(model, 80)
    y = tokens()
    grads = [torch.autograd.grad(ce(net(y), y), list(model.parameters())) for net in (model, unrolled)]
    assert model.deq.last_info.forward.all_converged
    for a, b in zip(*grads):
        assert rel_err(a, b) < 1e-8


def _cell_loss(model, y, names, depth=None):
    """The loss as a function of a flat vector of the cell parameters ``names`` (the rest
    fixed): through the DEQ (``depth=None``) or through ``depth`` unrolled layers."""
    cell = model.cell
    sizes = {n: p.shape for n, p in cell.named_parameters()}
    x = model.embed(y).detach()

    def loss(vec):
        parts = dict(zip(names, (t.reshape(sizes[n]) for t, n in zip(vec.split([math.prod(sizes[n]) for n in names]), names))))
        if depth is None:
            z = functional_call(model.deq, {"cell." + n: v for n, v in parts.items()}, (x,))
        else:
            z = torch.zeros_like(x)
            for _ in range(depth):
                z = functional_call(cell, parts, (z, x))
        return ce(F.linear(model.norm(z), model.embed.token.weight, model.head_bias), y)

    flat = torch.cat([dict(cell.named_parameters())[n].detach().reshape(-1) for n in names])
    return loss, flat


def test_hessian_vector_product_and_top_eigenvalue_equal_unrolled():
    """Loss Hessian w.r.t. cell parameters by double backward through the implicit node
    (every product: implicit solves) vs double backpropagation through 40 unrolled layers;
    the top eigenvalue by deqdiff's Lanczos against the dense unrolled Hessian."""
    from deqdiff.derivatives import eigsh

    model = tiny_deq()
    y = tokens(2, 3)
    names = ["out.bias", "ff1.bias"]
    implicit, flat = _cell_loss(model, y, names)
    unrolled, _ = _cell_loss(model, y, names, depth=40)
    v = torch.randn(flat.numel(), generator=torch.Generator().manual_seed(4))
    hv = torch.autograd.functional.hvp(implicit, flat, v)[1]
    assert rel_err(hv, torch.autograd.functional.hvp(unrolled, flat, v)[1]) < 1e-9
    ref = torch.autograd.functional.hessian(unrolled, flat)
    top = eigsh(lambda u: torch.autograd.functional.hvp(implicit, flat, u)[1], flat.numel(), k=1, num_iters=flat.numel())
    assert float(top[0]) == pytest.approx(float(torch.linalg.eigvalsh(ref)[-1]), rel=1e-8)


def test_split_loss_hessian_product_equals_double_backward():
    # the cell's layer norms: PyTorch's second-order forward mode of layer_norm is wrong, so
    # the split Hessian's curvature terms must use reverse passes only
    model = tiny_deq()
    y = tokens(2, 3)
    H = deq_loss_hessian(model, ce, y, y, tol=1e-12)
    names = [n for n, _ in model.cell.named_parameters()]
    implicit, flat = _cell_loss(model, y, names)
    v = torch.randn(flat.numel(), generator=torch.Generator().manual_seed(5))
    assert rel_err(H.flat_vp(v), torch.autograd.functional.hvp(implicit, flat, v)[1]) < 1e-8


@pytest.mark.slow
def test_hessian_spectrum_tool_on_the_lm():
    """``deqdiff.analysis.hessian_spectrum`` runs on the LM (finite, sorted); the products it
    uses are checked against double backward above."""
    model = tiny_deq()
    y = tokens(2, 3)
    out = hessian_spectrum(model, ce, y, y, k=2, terms=("total", "gauss_newton"), tol=1e-10)
    assert out["dim"] == sum(p.numel() for p in model.cell.parameters())
    assert all(math.isfinite(v) for v in out["total"] + out["gauss_newton"])
    assert out["gauss_newton"][0] >= out["gauss_newton"][1] >= -1e-10


def test_empirical_ntk_equals_explicit_unrolled_jacobians():
    model = tiny_deq()
    unrolled = unrolled_from_deq(model, 80)
    y = tokens(2, 3)
    K = empirical_ntk(model, y, mode="trace")
    params = {n: p.detach() for n, p in model.named_parameters()}
    J = []
    for i in range(2):
        jac = torch.func.jacrev(lambda p: functional_call(unrolled, p, (y[i:i + 1],)).reshape(-1))(params)
        J.append(torch.cat([j.reshape(j.shape[0], -1) for j in jac.values()], dim=1))
    ref = torch.stack([torch.stack([(J[a] * J[b]).sum() for b in range(2)]) for a in range(2)])
    assert rel_err(K, ref) < 1e-8
