"""``load_run`` on a ``deqdiff inverse`` run: the frozen reconstruction DEQ, measurements as
fitting and held-out inputs, a PSNR metric that reproduces the trainer's own evaluation, and
training time from the checkpoint's per-epoch history (wall and CPU time); then a neural solver
fitted to it reaches the model's tolerance in fewer f-evaluations than Anderson."""

from __future__ import annotations


import pytest

from deqdiff.training.checkpoint import save_checkpoint
from tests.training.helpers import fit_and_compare
from deqdiff.training.fit_solver import load_run
from deqdiff.training.inverse import (INVERSE_FORMAT, InverseConfig, evaluate_inverse, load_task_data,
                                      read_inverse_checkpoint, train_inverse)

TINY = dict(size=8, train_limit=32, test_limit=12, hidden=4, epochs=1, batch_size=16, models=("deq",))


@pytest.fixture(scope="module")
def inverse_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "inverse"
    result = train_inverse(InverseConfig(**TINY), out=out)
    return out, result


def test_load_run_rebuilds_the_deq_with_the_trainers_own_psnr(inverse_run):
    out, result = inverse_run
    run = load_run(out, fit_samples=32)
    assert run.kind == "inverse-deblur" and run.higher_is_better
    assert run.train_inputs.shape == (32, 1, 8, 8) and run.test_inputs.shape == (12, 1, 8, 8)
    assert run.tol == 1e-4 and run.max_iter == 50  # the InverseDEQ's defaults
    config = InverseConfig(**TINY)
    own = evaluate_inverse(result.models["deq"], load_task_data(config), config)
    out_run = run.model(run.test_inputs, on_fail="ignore")
    assert run.metric(out_run) == pytest.approx(own["psnr"], rel=1e-6)
    epochs = read_inverse_checkpoint(out)["runs"]["deq"]["history"]["epochs"]
    assert len(epochs) == 1 and epochs[0]["cpu_time_s"] > 0
    assert run.training_cpu_time_s == pytest.approx(epochs[0]["cpu_time_s"])
    assert run.training_time_s == pytest.approx(epochs[0]["time_s"])


def test_fitted_solver_reaches_the_models_tolerance(inverse_run):
    run, head = fit_and_compare(inverse_run[0], 32)
    assert head["converged_neural"] == 1.0 and head["converged_anderson"] == 1.0
    assert head["f_evals_neural"] < head["f_evals_anderson"]
    assert head["metric_neural"] == pytest.approx(head["metric_anderson"], abs=0.05)  # dB
    assert head["fit_cpu_share"] == pytest.approx(head["fit_cpu_time_s"] / run.training_cpu_time_s)


def test_a_run_without_a_deq_is_refused(tmp_path):
    (tmp_path / "unrolled").mkdir()
    config = InverseConfig(**{**TINY, "models": ("unrolled",)})
    save_checkpoint(tmp_path / "unrolled" / "checkpoint.pt", {"config": config.to_dict(), "runs": {"unrolled": {}}},
                    format=INVERSE_FORMAT)
    with pytest.raises(ValueError, match="no equilibrium layer"):
        load_run(tmp_path / "unrolled")
