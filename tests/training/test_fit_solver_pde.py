"""``load_run`` on the implicit PIDEQ of a ``deqdiff pinn poisson2d|kdv`` run: the frozen model,
its fitting inputs (uniform in the problem's box), held-out inputs (the evaluation grid), a
metric that reproduces the run's own ``results.json`` figure, and training time from the
checkpoint's per-step history; then a neural solver fitted to it reaches the model's tolerance."""

from __future__ import annotations

import json

import pytest
import torch

from deqdiff.physics.pde_jobs import JobConfig, run_job
from deqdiff.training.checkpoint import PINN_FORMAT, save_checkpoint
from tests.training.helpers import fit_and_compare
from deqdiff.training.fit_solver import load_run


@pytest.fixture(scope="module")
def poisson_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "poisson2d"
    cfg = JobConfig(problem="poisson2d", models=("deq",), epochs=3, collocation=32, boundary_points=8, width=8)
    run_job(cfg, out, progress=False)
    return out


def test_load_run_rebuilds_the_pideq_with_the_runs_own_metric(poisson_run):
    run = load_run(poisson_run, fit_samples=40)
    assert run.kind == "pinn-poisson2d" and not run.higher_is_better
    assert run.train_inputs.shape == (40, 2) and run.test_inputs.shape == (101 * 101, 2)
    assert bool((run.train_inputs >= 0).all() and (run.train_inputs <= 1).all())  # the unit square
    assert run.tol == 1e-5 and run.max_iter == 100
    results = json.loads((poisson_run / "results.json").read_text())
    with torch.no_grad():
        pred = run.model(run.test_inputs, on_fail="ignore")
    assert run.metric(pred) == pytest.approx(results["models"]["deq"]["rel_l2"], rel=1e-6)
    history = torch.load(poisson_run / "checkpoint_deq.pt", weights_only=False)["history"]
    assert len(history) == 3
    assert run.training_cpu_time_s == pytest.approx(sum(h["cpu_time"] for h in history))
    assert run.training_time_s == pytest.approx(sum(h["time"] for h in history))


def test_fitted_solver_reaches_the_models_tolerance_on_the_grid(poisson_run):
    run, head = fit_and_compare(poisson_run, 64)
    assert head["converged_neural"] == 1.0 and head["converged_anderson"] == 1.0
    assert head["f_evals_neural"] < head["f_evals_anderson"]
    assert head["metric_neural"] == pytest.approx(head["metric_anderson"], rel=1e-2)
    assert head["fit_cpu_share"] == pytest.approx(head["fit_cpu_time_s"] / run.training_cpu_time_s)


def test_a_pde_checkpoint_of_another_problem_is_refused(tmp_path):
    (tmp_path / "other").mkdir()
    save_checkpoint(tmp_path / "other" / "checkpoint_deq.pt", {"config": {"problem": "navier-stokes"}, "model": {}},
                    format=PINN_FORMAT)
    with pytest.raises(ValueError, match="unknown model kind"):
        load_run(tmp_path / "other")
