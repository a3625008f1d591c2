"""Smoke runs of ``deqdiff analyze`` with tiny settings (a few seconds each)."""

import json

import pytest

from deqdiff.cli import main

TINY = ["--train-limit", "32", "--batch-size", "32", "--no-progress"]


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("analyze")


def test_residuals(out):
    assert main(["analyze", "residuals", "--out", str(out), "--epochs", "1", "--samples", "4", "--max-iter", "5",
                 "--solvers", "anderson", *TINY]) == 0
    d = json.loads((out / "residuals.json").read_text())
    assert len(d["curves"]) == 4 and (out / "residuals.png").stat().st_size > 1000
    assert (out / "models" / "conv" / "epoch1.pt").is_file()


def test_trajectories_reuse_cached_models(out, capsys):
    assert main(["analyze", "trajectories", "--out", str(out), "--epochs", "0,1", "--samples", "6", "--max-iter", "4",
                 *TINY]) == 0
    assert "loaded cached snapshots" in capsys.readouterr().out
    d = json.loads((out / "trajectories.json").read_text())
    assert set(d["checkpoints"]) == {"epoch 0", "epoch 1"}


def test_stale_cached_snapshots_are_retrained(out, capsys):
    """A snapshot saved by a version whose model had other parameters is trained again, not a
    crash (a state dict from before a model's refactor)."""
    import torch

    (out / "models" / "conv" / "epoch1.pt").unlink()
    torch.save({"cell.U.weight": torch.zeros(2, 2)}, out / "models" / "conv" / "epoch1.pt")
    assert main(["analyze", "trajectories", "--out", str(out), "--epochs", "0,1", "--samples", "6", "--max-iter", "4",
                 *TINY]) == 0
    printed = capsys.readouterr().out
    assert "does not fit this model" in printed and "training to epoch 1" in printed
    assert set(torch.load(out / "models" / "conv" / "epoch1.pt")) != {"cell.U.weight"}


def test_hessian(out):
    assert main(["analyze", "hessian", "--out", str(out), "--epochs", "1", "--samples", "3", "--k", "1",
                 "--num-iters", "2", *TINY]) == 0
    d = json.loads((out / "hessian.json").read_text())
    assert set(d["track"][0]) >= {"total", "gauss_newton", "dynamics", "dim"}


def test_ntk(out):
    assert main(["analyze", "ntk", "--out", str(out), "--epochs", "0", "--samples", "4", "--width", "8",
                 "--rate-samples", "4", "--rate-width", "6", "--rate-steps", "2", *TINY]) == 0
    d = json.loads((out / "ntk.json").read_text())
    assert d["track"][0]["size"] == 40 and len(d["linear_rate"]["loss"]) == 3


def test_landscape(out):
    assert main(["analyze", "landscape", "--out", str(out), "--epochs", "1", "--models", "conv,repeat-2",
                 "--samples", "4", "--steps", "3", "--no-1d", *TINY]) == 0
    d = json.loads((out / "landscape.json").read_text())
    assert set(d["summary"]) == {"conv", "repeat-2"}
    assert len(d["landscapes_2d"]["conv"]["loss"]) == 3


def test_quick_swaps_defaults_but_explicit_flags_win(out):
    """``--quick`` is a smoke run: tiny defaults, recorded in the JSON's settings; a flag given on
    the command line keeps its value."""
    assert main(["analyze", "ntk", "--quick", "--samples", "4", "--out", str(out / "quick"), "--no-progress"]) == 0
    d = json.loads((out / "quick" / "ntk.json").read_text())
    s = d["settings"]
    assert s["quick"] and s["samples"] == 4 and s["width"] == 16 and s["epochs"] == [0, 1]
    assert s["train_limit"] == 64 and s["rate_steps"] == 5 and s["torch_threads"] == 1
    assert [t["epoch"] for t in d["track"]] == [0, 1] and d["track"][0]["size"] == 40


def test_defaults_train_to_the_train_commands_epochs():
    """Without --quick the analyses compare models trained as 'deqdiff train' does (15 epochs)."""
    from deqdiff.cli import build_parser
    from deqdiff.training import TrainConfig

    parse = build_parser().parse_args
    assert parse(["analyze", "residuals"]).epochs == [TrainConfig().epochs]
    for tool in ("trajectories", "ntk", "hessian"):
        assert max(parse(["analyze", tool]).epochs) == TrainConfig().epochs
    assert parse(["analyze", "landscape"]).epochs is None  # resolved to TrainConfig().epochs at run time
