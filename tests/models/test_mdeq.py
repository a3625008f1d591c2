"""Multiscale DEQ (Bai, Koltun & Kolter 2020): the cell against a written-out reference, implicit
derivatives (first and second order) against unrolled float64 autodiff of the same contractive
cell and against finite differences, batch independence, every forward solver, the derivative
API (Hessian spectrum, NTK), variational dropout, resume and data-parallel training."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from deqdiff.models.mdeq import MDEQ, MDEQCell, WeightNormConv2d, mdeq_cifar10, mdeq_digits
from tests.conftest import rel_err

TINY = dict(in_channels=1, num_classes=3, channels=(2, 4), hidden=(2, 4), groups=2, init_std=0.3)


def tiny_mdeq(gain: float = 0.05, **kw) -> MDEQ:
    """A 2-branch MDEQ on 1×4×4 images whose cell contracts strongly: the post-fusion group
    norms' scales are ``gain`` (the cell's Jacobian scales with them), their shifts and the
    other norms' affine parameters non-trivial."""
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = MDEQ(**{**TINY, **kw}, tol=1e-12, max_iter=300, on_fail="raise").double()
    with torch.no_grad():
        for name, p in model.cell.named_parameters():
            if "post" in name and name.endswith("2.weight"):
                p.fill_(gain)
            elif p.ndim == 1 and "weight_g" not in name:  # group-norm scales and shifts
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def unrolled(model: MDEQ, images, iters: int = 60, params=None):
    """z_k = f(z_{k−1}) from 0, then the head: plain autodiff through k cell applications."""
    x = model.injection(images)
    cell = model.cell
    z = cell.init_state(x)
    for _ in range(iters):
        z = cell(z, x) if params is None else torch.func.functional_call(cell, params, (z, x))
    return model.head(cell.branches(z, x))


def images(n=3, seed=1):
    return torch.randn(n, 1, 4, 4, generator=torch.Generator().manual_seed(seed))


# --- the cell ------------------------------------------------------------------------------------

def _wn(conv: WeightNormConv2d):
    v = conv.weight_v
    return conv.weight_g[:, None, None, None] * v / v.pow(2).sum(dim=(1, 2, 3), keepdim=True).sqrt()


def _reference_cell(cell: MDEQCell, z0, z1, x):
    """The cell of the paper written out with functional ops (upsampling by repeat_interleave)."""
    gn = F.group_norm

    def block(b, z, inj):
        y = F.relu(gn(F.conv2d(z, _wn(b.conv1), padding=1), 2, b.norm1.weight, b.norm1.bias))
        y = F.conv2d(y, _wn(b.conv2), padding=1)
        if inj is not None:
            y = y + inj
        return F.relu(gn(z + gn(y, 2, b.norm2.weight, b.norm2.bias), 2, b.norm3.weight, b.norm3.bias))

    y0, y1 = block(cell.blocks[0], z0, x), block(cell.blocks[1], z1, None)
    up_conv, up_norm = cell.fusion.fuse[0][1]
    up = gn(F.conv2d(y1, _wn(up_conv)), 2, up_norm.weight, up_norm.bias)
    u0 = y0 + up.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    down_conv, down_norm = cell.fusion.fuse[1][0]
    u1 = y1 + gn(F.conv2d(y0, _wn(down_conv), stride=2, padding=1), 2, down_norm.weight, down_norm.bias)
    out = []
    for u, post in zip((u0, u1), cell.fusion.post):
        out.append(gn(F.conv2d(F.relu(u), _wn(post[1])), 2, post[2].weight, post[2].bias))
    return out


def test_cell_matches_the_paper_written_out():
    model = tiny_mdeq()
    cell = model.cell
    x = torch.randn(3, 2, 4, 4)
    z = torch.randn(3, cell.state_size(x))
    z0, z1 = z[:, :32].reshape(3, 2, 4, 4), z[:, 32:].reshape(3, 4, 2, 2)
    ref = _reference_cell(cell, z0, z1, x)
    out = cell.branches(cell(z, x), x)
    assert [tuple(o.shape) for o in out] == [(3, 2, 4, 4), (3, 4, 2, 2)]
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_weight_norm_conv_is_g_times_direction():
    torch.manual_seed(0)
    conv = WeightNormConv2d(2, 3, 3, padding=1, init_std=0.5)
    assert conv.weight_g.shape == (3,)
    torch.testing.assert_close(conv.weight, conv.weight_v)  # g = ‖v‖ at initialization
    with torch.no_grad():
        conv.weight_g.mul_(torch.arange(1.0, 4.0))
        conv.weight_v.mul_(7.0)  # the direction's scale does not matter
    norms = conv.weight.flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, conv.weight_g)
    x = torch.randn(2, 2, 4, 4)
    torch.testing.assert_close(conv(x), F.conv2d(x, _wn(conv), padding=1))
    v = conv.weight_v.detach().clone().requires_grad_()
    g = conv.weight_g.detach().clone().requires_grad_()

    def fn(v, g):
        return torch.func.functional_call(conv, {"weight_v": v, "weight_g": g}, (x,))

    # torch.nn.utils.parametrizations.weight_norm fails this check (second derivative in v)
    assert torch.autograd.gradgradcheck(fn, (v, g), fast_mode=True)


def test_state_views_and_shapes():
    cell = MDEQCell((4, 8, 16), groups=4)
    x = torch.randn(2, 4, 8, 8)
    z = torch.randn(2, cell.state_size(x))
    assert cell.state_size(x) == 4 * 64 + 8 * 16 + 16 * 4
    parts = cell.branches(z, x)
    assert [tuple(p.shape) for p in parts] == [(2, 4, 8, 8), (2, 8, 4, 4), (2, 16, 2, 2)]
    assert all(p.untyped_storage().data_ptr() == z.untyped_storage().data_ptr() for p in parts)  # views
    assert torch.equal(MDEQCell.flatten(parts), z)
    with pytest.raises(ValueError, match="divisible by 4"):
        cell.branch_shapes(torch.randn(1, 4, 6, 6))
    with pytest.raises(ValueError, match="2 to 4 resolution branches"):
        MDEQCell((4,))
    with pytest.raises(ValueError, match="divisible by the number of groups"):
        MDEQCell((4, 6), groups=4)


def test_configs_have_the_papers_resolutions():
    torch.manual_seed(0)
    digits, cifar = mdeq_digits(), mdeq_cifar10()
    assert [s[1:] for s in digits.cell.branch_shapes(torch.zeros(1, 16, 8, 8))] == [(8, 8), (4, 4)]
    assert [s[1:] for s in cifar.cell.branch_shapes(torch.zeros(1, 16, 32, 32))] == [(32, 32), (16, 16), (8, 8), (4, 4)]
    with torch.no_grad():
        assert cifar(torch.randn(2, 3, 32, 32), max_iter=3, on_fail="ignore").shape == (2, 10)


# --- implicit derivatives -----------------------------------------------------------------------

def test_equilibrium_and_second_derivatives_equal_unrolled():
    model = tiny_mdeq()
    x = images(2).requires_grad_()
    params = list(model.parameters())

    def second_order(net):
        out = net(x)
        (g,) = torch.autograd.grad(out[:, 0].sum(), x, create_graph=True)
        return torch.autograd.grad((g ** 2).sum() + out.pow(2).sum(), params)

    assert rel_err(model(x), unrolled(model, x)) < 1e-12
    assert model.deq.last_info.forward.iterations.max() < 60  # strongly contractive
    got, ref = second_order(model), second_order(lambda i: unrolled(model, i))
    scale = torch.cat([r.reshape(-1) for r in ref]).norm()
    for a, b in zip(got, ref):  # some shifts (e.g. before a group norm) have gradients at rounding level
        assert (a - b).norm() <= 1e-8 * max(float(b.norm()), 1e-6 * float(scale))


def test_gradcheck_and_gradgradcheck_in_inputs_and_weight_norm_parameters():
    model = tiny_mdeq()
    x = images(2).requires_grad_()
    names = ["deq.cell.blocks.0.conv2.weight_v", "deq.cell.fusion.fuse.0.1.0.weight_g"]
    values = [dict(model.named_parameters())[n].detach().clone().requires_grad_() for n in names]

    def fn(x, *ps):
        return torch.func.functional_call(model, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(fn, (x, *values), eps=1e-6, atol=1e-6, fast_mode=True)
    assert torch.autograd.gradgradcheck(fn, (x, *values), eps=1e-6, atol=1e-5, fast_mode=True)


def test_samples_are_independent():
    model = tiny_mdeq()
    x = images(4)
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(together, alone, rtol=1e-10, atol=1e-12)
    x = images(4).requires_grad_()
    out = model(x)
    (g,) = torch.autograd.grad(out[1].sum(), x)
    assert g[[0, 2, 3]].abs().max() == 0 and g[1].abs().max() > 0


@pytest.mark.parametrize("solver", ["anderson", "broyden", "fixed_point", "newton_krylov"])
def test_every_forward_solver(solver):
    model = tiny_mdeq()
    x = images(2)
    ref_out = unrolled(model, x)
    w = model.cell.blocks[1].conv1.weight_v
    (ref_grad,) = torch.autograd.grad(ref_out.pow(2).sum(), w)
    out = model(x, solver=solver, tol=1e-11)
    assert model.deq.last_info.forward.converged.all()
    (grad,) = torch.autograd.grad(out.pow(2).sum(), w)
    assert rel_err(out, ref_out) < 1e-9
    assert rel_err(grad, ref_grad) < 1e-8


def test_non_convergence_is_reported_with_its_residual():
    model = tiny_mdeq()
    with pytest.warns(Warning, match="did not converge.*residual"):
        model(images(2), max_iter=2, on_fail="warn")
    assert not model.deq.last_info.forward.converged.all()
    assert float(model.deq.last_info.forward.rel_residual.max()) > 1e-12


# --- variational dropout ------------------------------------------------------------------------

def test_dropout_mask_is_one_per_solve_and_off_in_eval():
    model = tiny_mdeq(dropout=0.5)
    x = images(3)
    model.train()
    torch.manual_seed(3)
    out = model(x)
    info = model.deq.last_info.forward
    assert info.converged.all()
    masks = [b.drop.mask for b in model.cell.blocks]
    assert all(m is not None and m.shape[2:] == (1, 1) for m in masks)
    # with the masks kept, the solution is the fixed point of the masked cell
    xin = model.injection(x)
    torch.manual_seed(3)  # the same masks again
    z = model.deq(xin)
    torch.testing.assert_close(model.cell(z, xin), z, rtol=0, atol=1e-10)
    torch.testing.assert_close(model.head(model.cell.branches(z, xin)), out)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), tiny_mdeq()(x))


# --- derivative API -----------------------------------------------------------------------------

def test_hessian_eigenpair_is_one_of_the_unrolled_hessian():
    """The top eigenpair (λ, u) that Lanczos finds from implicit Hessian-vector products
    satisfies H u = λ u for the Hessian of the unrolled loss (double backward through 60
    applications of the contractive cell)."""
    from deqdiff.analysis.hessian import deq_loss_hessian
    from deqdiff.derivatives import hessian_eigenvalues

    model = tiny_mdeq()
    x, y = images(3), torch.tensor([0, 1, 2])
    theta = {n: p.detach() for n, p in model.cell.named_parameters()}

    def loss(*tensors):
        return F.cross_entropy(unrolled(model, x, params=dict(zip(theta, tensors))), y)

    H = deq_loss_hessian(model, F.cross_entropy, x, y)
    vals, vecs = hessian_eigenvalues(H, k=1, num_iters=20, return_eigenvectors=True)
    lam, u = float(vals[0]), vecs[0]
    parts = torch.split(u, [t.numel() for t in theta.values()])
    u_tree = tuple(p.view_as(t) for p, t in zip(parts, theta.values()))
    _, Hu = torch.autograd.functional.vhp(loss, tuple(theta.values()), u_tree)
    Hu = torch.cat([h.reshape(-1) for h in Hu])
    assert H.dim == u.numel() == sum(t.numel() for t in theta.values())
    assert rel_err(H.flat_vp(u), Hu) < 1e-8  # the implicit product equals the unrolled one
    assert float((Hu - lam * u).norm()) <= 1e-3 * abs(lam)  # and u is (to Lanczos' accuracy) an eigenvector


def test_ntk_on_a_subset_equals_unrolled_jacobians():
    from deqdiff.analysis.ntk import empirical_ntk

    model = tiny_mdeq()
    x = images(3)
    names = [n for n, p in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}

    def out(p, xi):
        cell_p = {k[len("deq.cell."):]: v for k, v in p.items() if k.startswith("deq.cell.")}
        with torch.nn.utils.stateless._reparametrize_module(model, {k: v for k, v in p.items()
                                                                    if not k.startswith("deq.cell.")}):
            return unrolled(model, xi[None], iters=80, params=cell_p).reshape(-1)

    J = torch.func.vmap(torch.func.jacrev(out), in_dims=(None, 0))(params, x)
    Jm = torch.cat([J[n].reshape(3, 3, -1) for n in names], dim=-1).reshape(9, -1)
    K = empirical_ntk(model, x, tol=1e-12)
    torch.testing.assert_close(K, Jm @ Jm.T, rtol=1e-8, atol=1e-10)


def test_landscape_center_is_the_trained_loss():
    from deqdiff.analysis.landscape import landscape_1d

    model = tiny_mdeq()
    x, y = images(4), torch.tensor([0, 1, 2, 0])
    land = landscape_1d(model, F.cross_entropy, x, y, steps=3, span=(-0.5, 0.5), points_per_batch=3)
    with torch.no_grad():
        center = float(F.cross_entropy(model(x), y))
    assert land.center_loss == pytest.approx(center, rel=1e-9)
    assert torch.isfinite(land.loss).all() and land.meta["convergence_warnings"] == 0


# --- training: resume and data-parallel ----------------------------------------------------------

def _same_run(a, b):
    for (name, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(p, q), name
    times = ("time_s", "cpu_time_s")  # clocks differ between runs; everything else must not
    strip = [{k: v for k, v in e.items() if k not in times} for e in a.history["epochs"]]
    assert strip == [{k: v for k, v in e.items() if k not in times} for e in b.history["epochs"]]
    assert a.history["steps"] == b.history["steps"]


def test_training_resumes_bit_exactly_with_dropout(tmp_path):
    """5 steps per epoch; stops mid-epoch 1 (step 3) and resumes across the epoch's end: the
    dropout masks are drawn from the restored generator, so the run equals the uninterrupted
    one bit for bit."""
    from deqdiff.training import read_checkpoint, train
    from tests.training.helpers import tiny_config, tiny_data

    data = tiny_data()
    settings = dict(model="mdeq", dropout=0.3, epochs=2, max_iter=20)
    straight = train(tiny_config(**settings, max_steps=6, out=str(tmp_path / "a")), data)
    train(tiny_config(**settings, max_steps=3, out=str(tmp_path / "b")), data)
    assert read_checkpoint(tmp_path / "b")["step_in_epoch"] == 3
    resumed = train(tiny_config(**settings, max_steps=6, out=str(tmp_path / "b")), data, resume=True)
    assert resumed.steps == straight.steps == 6 and len(straight.history["epochs"]) == 1
    _same_run(straight, resumed)
    assert straight.history["steps"][-1]["fwd_iter_mean"] > 0
    assert any(b.drop.p == 0.3 for b in straight.model.cell.blocks)


def _ddp_worker(rank: int, world: int, init_file: str, config: dict, out: str) -> None:
    import os
    import sys

    import torch.distributed as dist

    from deqdiff.training import TrainConfig, train
    from tests.training.helpers import tiny_data

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    result = train(TrainConfig.from_dict(config), tiny_data())
    if rank == 0:
        torch.save({"state": result.model.state_dict(), "history": result.history}, out)
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip gloo's teardown (it occasionally aborts a finished rank)


@pytest.mark.slow
def test_two_process_training_equals_single_process(tmp_path):
    """Batch 9 over 2 ranks (shards of 5 and 4 samples), float64, tight solves: the gradients
    summed over ranks equal the single-process ones, so the parameters agree to rounding."""
    import torch.multiprocessing as mp

    from deqdiff.training import train
    from tests.training.helpers import tiny_config, tiny_data

    config = tiny_config(model="mdeq", dtype="float64", batch_size=9, max_steps=4, tol=1e-10, max_iter=80)
    single = train(config, tiny_data())
    out = str(tmp_path / "ddp.pt")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "store"), config.to_dict(), out), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=True)
    # Adam divides each step by the root of the squared gradients, so entries whose gradient is
    # near zero carry the solves' 1e-10 tolerance into the weights at about 1e-8 relative
    for name, p in single.model.state_dict().items():
        torch.testing.assert_close(ddp["state"][name], p, rtol=1e-7, atol=1e-9)
    for a, b in zip(single.history["steps"], ddp["history"]["steps"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-10) and a["acc"] == b["acc"]
    assert len(ddp["history"]["steps"]) == 4


def test_cifar10_shape_trains_from_python_batches(tmp_path):
    """``deqdiff train --model mdeq --data cifar10``: four branches (32, 16, 8, 4 px) and the
    average-pooling head, on generated files in the CIFAR-10 python batch format."""
    from deqdiff.training import TrainConfig, train
    from tests.data.test_datasets import make_cifar

    make_cifar(tmp_path, n=2)
    config = TrainConfig(model="mdeq", data="cifar10", data_dir=str(tmp_path), channels=4, hidden=4, groups=2,
                         batch_size=4, max_steps=1, epochs=1, max_iter=4, progress=False)
    result = train(config)
    assert len(result.model.cell.channels) == 4 and result.model.head.pool == "avg"
    assert result.steps == 1 and math.isfinite(result.history["steps"][0]["loss"])


@pytest.mark.slow  # ~6 s: trains a step, evaluates a 3×3 grid, draws the figures
def test_cli_landscape_of_the_mdeq_on_held_out_images(tmp_path):
    import json

    from deqdiff.cli import main

    assert main(["analyze", "landscape", "--model", "mdeq", "--out", str(tmp_path), "--epochs", "1",
                 "--train-limit", "16", "--batch-size", "16", "--samples", "5", "--steps", "3", "--no-1d",
                 "--no-progress"]) == 0
    d = json.loads((tmp_path / "landscape.json").read_text())
    assert d["models"] == ["mdeq"] and d["split"] == "test" and d["samples"] == 5
    assert len(d["landscapes_2d"]["mdeq"]["loss"]) == 3 and (tmp_path / "landscape_contour.png").is_file()
