"""Checkpoint/resume restores everything: the resumed run takes bit-identical steps,
across the Adam → L-BFGS phase boundary; the rollout; bad configurations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deqdiff.physics.rollout import rollout
from deqdiff.physics.vdp import VdPConfig, build_trainer, evaluate


def _tiny(setup="pideq", **kw):
    base = dict(width=6, batch=8, epochs=4, lbfgs_steps=2, n_test=2, rollout_t_end=1.0, dtype="float64")
    base.update(kw)
    return VdPConfig.for_setup(setup, **base)


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("setup", ["pideq", "conditioned"])
def test_resume_is_bit_identical(tmp_path, setup):
    cfg = _tiny(setup)
    a = build_trainer(cfg)
    a.run(3)
    a.save(tmp_path / "ck.pt")
    torch.manual_seed(999)  # resuming must restore the global RNG too
    a.run()  # through the Adam → L-BFGS boundary to the end
    b = build_trainer(cfg)
    assert not all(torch.equal(p, q) for p, q in zip(_params(a.model), _params(b.model)))
    b.load(tmp_path / "ck.pt")
    b.run()
    assert a.step_count == b.step_count == 6
    for p, q in zip(_params(a.model), _params(b.model)):
        assert torch.equal(p, q)
    for ha, hb in zip(a.history, b.history):
        assert {k: v for k, v in ha.items() if k not in ("time", "cpu_time")} == {
            k: v for k, v in hb.items() if k not in ("time", "cpu_time")}
    assert [h["phase"] for h in b.history] == ["adam"] * 4 + ["lbfgs"] * 2


def test_training_reduces_the_loss():
    cfg = _tiny("pideq", epochs=30, lbfgs_steps=0, lr=1e-2)
    tr = build_trainer(cfg)
    tr.run()
    assert tr.history[-1]["total"] < 0.5 * tr.history[0]["total"]


class _ExactDecay(torch.nn.Module):
    """Exact flow map of dy/dt = −k y: y(Δ; y0) = y0·exp(−kΔ) (inputs [Δ, y0, k])."""

    horizon = 0.3

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return x[:, 1:3] * torch.exp(-x[:, 3:4] * x[:, :1])


def test_rollout_composes_the_flow_map():
    t, y = rollout(_ExactDecay(), [1.0, -2.0], 1.0, cond=(0.7,), points_per_step=4)
    assert t[0] == 0 and abs(t[-1] - 1.0) < 1e-12  # 1.0 is not a multiple of 0.3: last step shortened
    assert np.all(np.diff(t) > 0)
    exact = np.exp(-0.7 * t)[:, None] * np.array([1.0, -2.0])
    np.testing.assert_allclose(y, exact, rtol=1e-12)
    with pytest.raises(ValueError, match="horizon"):
        rollout(_ExactDecay(), [1.0, 0.0], 1.0, cond=(1.0,), horizon=-0.1)
    with pytest.raises(ValueError, match="NaN"):
        rollout(_ExactDecay(), [float("nan"), 0.0], 1.0, cond=(1.0,))


def test_evaluate_reports_errors_against_reference():
    cfg = _tiny("conditioned")
    tr = build_trainer(cfg)
    ev = evaluate(cfg, tr.model)
    m = ev["metrics"]
    assert ev["ref"].shape == ev["pred"].shape == (2, 21, 2)
    np.testing.assert_allclose(ev["pred"][:, 0], ev["y0s"], atol=1e-12)  # IC by construction
    assert 0 < m["held_out_rel_l2"] < m["held_out_increment_rel_l2"]
    assert m["rollout_rel_l2"] > 0 and abs(ev["t"][-1] - 1.0) < 1e-12


@pytest.mark.parametrize("bad, match", [
    (dict(horizon=-0.5), "horizon must be a positive"),
    (dict(horizon=float("nan")), "horizon must be a positive"),
    (dict(epochs=-1), "epochs must be ≥ 0"),
    (dict(mu=float("nan")), "must be finite"),
    (dict(y0=(0.0, float("inf"))), "must be finite"),
    (dict(model="transformer"), "model must be"),
    (dict(nonsense=1), "unknown config field"),
])
def test_bad_configs_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        VdPConfig.for_setup("conditioned", **bad)


def test_unknown_setup():
    with pytest.raises(ValueError, match="unknown setup"):
        VdPConfig.for_setup("lorenz")


@pytest.mark.slow
def test_default_conditioned_run_meets_its_targets():
    """The README's main job on defaults (≈ 80 s CPU): held-out relative L2 ≤ 1e-2 and a long
    rollout at least as accurate as the exact Taylor skip alone."""
    torch.set_num_threads(1)
    cfg = VdPConfig.for_setup("conditioned")
    tr = build_trainer(cfg)
    tr.run()
    m = evaluate(cfg, tr.model)["metrics"]
    assert m["held_out_rel_l2"] <= 1e-2
    assert m["held_out_remainder_rel_l2"] < 0.2  # the DEQ learned most of the remainder
    assert m["rollout_rel_l2"] <= m["skip_only_rollout_rel_l2"]


def test_pideq_setup_implicit_training_tracks_unrolled():
    """The PIDEQ setup of Pacheco & Camponogara 2022 (80 states, 1000 points, tol 1e-4, free A): the implicit gradient
    (Anderson forward) and the gradient unrolled through plain iteration agree while every
    solve converges, so the two trainings must take the same steps. Before Anderson's restart
    safeguard, at epoch 18 a few rows bounced for 100+ Anderson iterations (plain iteration
    needed 49), the unconverged rows gave a gradient of norm 1e9 and the implicit training
    derailed (loss 0.45 vs 0.06 at epoch 40)."""
    common = dict(epochs=30, lr=1e-3, lr_final=1e-3)
    cfgs = {"pideq": VdPConfig.for_setup("pideq", model="pideq", solver="anderson", **common),
            "unrolled": VdPConfig.for_setup("pideq", model="unrolled", solver="fixed_point", **common)}
    runs = {}
    for m, cfg in cfgs.items():
        tr = build_trainer(cfg)
        iters = []
        for _ in range(cfg.epochs):
            tr.step()
            iters.append(int(tr.model.last_iterations.max()))
        runs[m] = ([h["total"] for h in tr.history], iters)
    (imp, imp_iters), (unr, _) = runs["pideq"], runs["unrolled"]
    assert max(imp_iters) < cfgs["pideq"].max_iter  # every forward solve converged
    assert imp[-1] < 0.3 * imp[0]
    np.testing.assert_allclose(imp, unr, rtol=1e-2)  # both stop at tol 1e-4, at different iterates


def test_unrolled_baseline_records_the_same_solver_and_its_options():
    """``--model unrolled`` differentiates the loop of the configured forward solver (here
    Anderson: PIDEQ's own approach), with that solver's options."""
    from deqdiff.physics.vdp import build_model

    model = build_model(VdPConfig.for_setup("pideq", model="unrolled", solver="anderson", width=6, dtype="float64"))
    assert model.mode == "unrolled" and model.unrolled_solver == "anderson"
    model.deq.solver_options["m"] = 0  # reaches the solver: Anderson rejects it
    with pytest.raises(ValueError, match="memory m"):
        model(torch.rand(4, 1))


def test_a_non_finite_gradient_skips_the_update_and_is_recorded():
    from deqdiff.physics.losses import LossTerms
    from deqdiff.physics.training import Phase, Trainer

    model = torch.nn.Linear(2, 1)
    poison = [False]  # as a failed derivative solve would: a finite loss with a NaN gradient
    model.weight.register_hook(lambda g: torch.full_like(g, float("nan")) if poison[0] else g)

    def loss_fn(model, batch, gen):
        out = model(batch).pow(2).mean()
        return LossTerms(out, {"total": float(out)})

    trainer = Trainer(model, loss_fn, lambda gen, k: torch.randn(8, 2, generator=gen),
                      [Phase("adam", 3, lambda p: torch.optim.Adam(p, lr=1e-2))])
    trainer.run(1)
    before = [p.detach().clone() for p in model.parameters()]
    poison[0] = True
    with pytest.warns(RuntimeWarning, match="non-finite gradient"):
        trainer.run(1)
    assert trainer.history[-1]["skipped"]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    poison[0] = False
    trainer.run(1)
    assert not trainer.history[-1]["skipped"]
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
