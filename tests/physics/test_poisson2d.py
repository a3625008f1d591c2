"""2-D Poisson problem and the `deqdiff pinn poisson2d` job: the analytic solution makes every
term vanish, a short implicit-DEQ run lowers the loss, the CLI writes JSON and figures for the
DEQ and its baselines, and bad flags are one-line errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from deqdiff.cli import main
from deqdiff.physics.poisson2d import exact, poisson2d


class _Exact(nn.Module):
    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, X, **_):
        return (torch.sin(math.pi * X[:, 0]) * torch.sin(math.pi * X[:, 1]) + 0 * self.dummy)[:, None]


def test_analytic_solution_has_zero_residual_and_boundary_terms():
    pb = poisson2d(64, 16)
    out = pb.loss(_Exact(), pb.sample(torch.Generator().manual_seed(0), 0, None))
    assert out.terms["pde"] < 1e-24 and out.terms["dirichlet_x"] < 1e-28 and out.terms["dirichlet_y"] < 1e-28
    X = np.array([[0.5, 0.5], [0.25, 1.0]])
    assert np.allclose(exact(X), [1.0, 0.0])


def test_cli_runs_deq_and_mlp_and_writes_results(tmp_path, capsys):
    out = tmp_path / "p"
    rc = main(["pinn", "poisson2d", "--epochs", "2", "--collocation", "16", "--boundary-points", "4", "--width", "5",
               "--models", "deq,mlp", "--out", str(out), "--no-progress", "--dtype", "float64"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["models"]) == {"deq", "mlp"} and (out / "poisson2d_deq.png").is_file()
    assert "relative L2" in capsys.readouterr().out


@pytest.mark.slow
def test_cli_runs_deq_and_baselines_and_resumes(tmp_path, capsys):
    out = tmp_path / "p"
    rc = main(["pinn", "poisson2d", "--epochs", "3", "--collocation", "24", "--boundary-points", "8", "--width", "6",
               "--out", str(out), "--no-progress", "--dtype", "float64"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["models"]) == {"deq", "unrolled", "mlp"}
    for m in res["models"].values():
        assert m["rel_l2"] > 0 and m["epoch_time_median_s"] > 0 and m["graph_memory_mb"] > 0
        assert m["target_met"] == (m["rel_l2"] <= 1e-2)
    # the MLP baseline has about the DEQ's parameter count
    p = {k: v["parameters"] for k, v in res["models"].items()}
    assert p["deq"] == p["unrolled"] and abs(p["mlp"] - p["deq"]) <= 0.2 * p["deq"]
    for f in res["figures"]:
        assert (tmp_path / f).is_file() or __import__("pathlib").Path(f).is_file()
    assert "relative L2" in capsys.readouterr().out
    # resume: every model's checkpoint is complete, so nothing trains and results are identical
    rc = main(["pinn", "poisson2d", "--epochs", "3", "--collocation", "24", "--boundary-points", "8", "--width", "6",
               "--out", str(out), "--no-progress", "--dtype", "float64", "--resume"])
    again = json.loads((out / "results.json").read_text())
    assert rc == 0 and all(again["models"][k]["rel_l2"] == res["models"][k]["rel_l2"] for k in res["models"])


@pytest.mark.parametrize("flags, message", [
    (["--models", "deq,cnn"], "--models"),
    (["--epochs", "-3"], "--epochs"),
    (["--sampler", "sobol"], "--sampler"),
    (["--solver", "nope"], "--solver"),
    (["--resume"], "--resume"),
])
def test_bad_flags_are_one_line_errors(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) if flags[0] in ("--epochs", "--sampler") else _nothing():
        rc = main(["pinn", "poisson2d", "--out", str(tmp_path / "o"), "--no-progress", *flags])
        assert rc == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
