"""``deqdiff fit-solver``: fits a neural solver to tiny trained runs (conv DEQ on digits, the
physics-informed Van der Pol DEQ, the PIDEQ of ``deqdiff pinn poisson2d``), writes it next to the
model with JSON and PNG results, and answers bad input with one line naming the flag or file."""

from __future__ import annotations

import json

import pytest
import torch

from deqdiff.cli import main
from deqdiff.solvers.neural import NeuralSolver
from deqdiff.training.checkpoint import save_checkpoint

FAST = ["--fit-samples", "16", "--steps", "3", "--batch", "8", "--unroll", "3", "--budgets", "2,3", "--gt-tol", "1e-3",
        "--init-steps", "4", "--init-batch", "8", "--no-progress"]


@pytest.fixture(scope="module")
def conv_run(tmp_path_factory):
    from deqdiff.training import TrainConfig, train

    out = tmp_path_factory.mktemp("runs") / "conv"
    train(TrainConfig(epochs=1, train_limit=48, test_limit=24, channels=8, hidden=8, out=str(out), progress=False))
    return out


@pytest.fixture(scope="module")
def vdp_run(tmp_path_factory):
    from deqdiff.physics.vdp import VdPConfig, run

    out = tmp_path_factory.mktemp("runs") / "vdp"
    cfg = VdPConfig.for_setup("conditioned", epochs=2, lbfgs_steps=0, n_test=3, rollout_t_end=0.2, width=12, batch=16)
    run(cfg, out, progress=False, plots=False)
    return out


@pytest.fixture(scope="module")
def poisson_run(tmp_path_factory):
    from deqdiff.physics.pde_jobs import JobConfig, run_job

    out = tmp_path_factory.mktemp("runs") / "poisson2d"
    run_job(JobConfig(problem="poisson2d", models=("deq",), epochs=2, collocation=32, boundary_points=8, width=8), out,
            progress=False)
    return out


@pytest.mark.parametrize("which", ["conv_run", "vdp_run", "poisson_run"])
def test_fit_solver_writes_solver_json_and_png(which, request, capsys):
    run_dir = request.getfixturevalue(which)
    out = run_dir / "report"
    assert main(["fit-solver", "--from", str(run_dir), "--out", str(out), *FAST]) == 0
    report = json.loads((out / "fit_solver.json").read_text())
    assert (out / "fit_solver.png").stat().st_size > 0
    summary = report["summary"]
    assert summary["training_time_s"] > 0 and summary["fit_time_share"] == pytest.approx(
        summary["fit_time_s"] / summary["training_time_s"])
    assert set(report["solvers"]) >= {"neural", "anderson", "broyden", "fixed_point"}
    for rec in report["solvers"].values():
        assert [b["f_evals"] for b in rec["budgets"]] == [2, 3]
        assert all(b["f_evals_max"] <= b["f_evals"] for b in rec["budgets"])
        assert rec["at_tol"]["f_evals_mean"] >= 1
    solver = NeuralSolver.load(run_dir / "neural_solver.pt")
    assert solver.extra["kind"] == summary["kind"]
    assert summary["initializer"] == "kernel" and summary["initializer_fit"]["ridge"] > 0
    # both trainers record CPU time: the fit's CPU share is reported next to the wall share
    assert summary["training_cpu_time_s"] > 0 and summary["fit_cpu_share"] == pytest.approx(
        summary["fit_cpu_time_s"] / summary["training_cpu_time_s"])
    assert "neural solver (kernel initializer) fitted" in capsys.readouterr().out


def test_budget_share_limits_the_fit_to_a_share_of_the_training_time(conv_run):
    """A share so small that the budget is spent on the ground truth: no fitting step runs, and the
    solver (least-squares initializer, untrained mixer) is still written and compared."""
    out = conv_run / "budget"
    argv = [*FAST, "--initializer", "network", "--init-steps", "1000", "--steps", "1000", "--budget-share", "1e-6"]
    assert main(["fit-solver", "--from", str(conv_run), "--out", str(out), *argv]) == 0
    summary = json.loads((out / "fit_solver.json").read_text())["summary"]
    assert summary["init_steps_done"] == 0 and summary["steps_done"] == 0
    assert set(summary["fit_phases_wall_cpu_s"]) == {"ground_truth", "ridge", "init", "unrolled", "final"}


def _foreign(root):
    (root / "foreign").mkdir()
    save_checkpoint(root / "foreign" / "checkpoint.pt", {"x": torch.zeros(1)}, format="someone-else/1")
    return root / "foreign"


def _empty(root):
    (root / "empty").mkdir()
    return root / "empty"


def _corrupt(root):
    (root / "corrupt").mkdir()
    (root / "corrupt" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    return root / "corrupt"


BAD = {
    "corrupt checkpoint": (lambda t: ["--from", str(_corrupt(t))], "not a readable deqdiff checkpoint"),
    "missing run dir": (lambda t: ["--from", str(t / "nope")], "--from"),
    "no checkpoint": (lambda t: ["--from", str(_empty(t))], "checkpoint.pt"),
    "unknown model kind": (lambda t: ["--from", str(_foreign(t))], "unknown model kind"),
    "budget below 2": (lambda t: ["--from", str(t), "--budgets", "1,4"], "--budgets"),
    "steps negative": (lambda t: ["--from", str(t), "--steps", "-1"], "--steps"),
    "lr nan": (lambda t: ["--from", str(t), "--lr", "nan"], "--lr"),
    "budget share negative": (lambda t: ["--from", str(t), "--budget-share", "-0.05"], "--budget-share"),
    "init steps negative": (lambda t: ["--from", str(t), "--init-steps", "-1"], "--init-steps"),
    "no --from": (lambda t: [], "--from"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line(case, tmp_path, capsys):
    argv, fragment = BAD[case]
    parse_errors = ("budget below 2", "steps negative", "lr nan", "no --from", "budget share negative", "init steps negative")
    with pytest.raises(SystemExit) if case in parse_errors else _nothing():
        code = main(["fit-solver", *argv(tmp_path)])
        assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err and "Traceback" not in err, err


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
