"""``deqdiff pinn``: a tiny end-to-end run, resume, and clear errors for bad input."""

from __future__ import annotations

import json

import pytest
import torch

from deqdiff.cli import main

TINY = ["--epochs", "2", "--width", "4", "--batch", "8", "--n-test", "2", "--rollout-t-end", "0.5",
        "--lbfgs-steps", "0", "--no-progress", "--threads", "1"]


def test_vdp_smoke_run_and_resume(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pinn", "vdp", "--out", str(out), *TINY]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["training"]["epochs"] == 2
    assert {"held_out_rel_l2", "rollout_rel_l2", "rollout_iae"} <= set(res["metrics"])
    for name in ("vdp_trajectory.png", "vdp_phase.png", "vdp_loss.png", "checkpoint.pt"):
        assert (out / name).stat().st_size > 0
    assert "held-out initial states" in capsys.readouterr().out
    # resume with more epochs continues from epoch 2
    args = [a if a != "2" else "3" for a in TINY]
    assert main(["pinn", "vdp", "--out", str(out), "--resume", *args]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["training"]["epochs"] == 3


def test_pideq_setup_smoke(tmp_path):
    out = tmp_path / "p"
    assert main(["pinn", "vdp", "--setup", "pideq", "--out", str(out), "--no-plots", *TINY]) == 0
    assert "rel_l2" in json.loads((out / "results.json").read_text())["metrics"]


@pytest.mark.parametrize("flags, message", [
    (["--horizon", "-1"], "horizon must be a positive"),
    (["--mu", "nan"], "must be finite"),
    (["--resume", "/nonexistent/ck.pt"], "no checkpoint"),
])
def test_bad_flags_exit_with_message(tmp_path, capsys, flags, message):
    assert main(["pinn", "vdp", "--out", str(tmp_path), *TINY, *flags]) == 2
    assert message in capsys.readouterr().err


def test_unknown_problem_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["pinn", "lorenz"])
    assert exc.value.code == 2
    assert "invalid choice: 'lorenz'" in capsys.readouterr().err


# --- resume at every kind of boundary: bitwise equal to an uninterrupted run -------------------

VDP = ["--epochs", "3", "--lbfgs-steps", "2", "--width", "4", "--batch", "8", "--n-test", "2", "--rollout-t-end", "0.3",
       "--dtype", "float64", "--checkpoint-every", "1", "--no-progress", "--no-plots"]


def _vdp(out, *flags):
    return main(["pinn", "vdp", "--out", str(out), *VDP, *flags])


def _ckpt(out):
    return torch.load(out / "checkpoint.pt", weights_only=True)


def _untimed(history):
    return [{k: v for k, v in h.items() if k not in ("time", "cpu_time")} for h in history]


def _assert_same_vdp(a, b):
    ca, cb = _ckpt(a), _ckpt(b)
    assert ca["step"] == cb["step"]
    for name, p in ca["model"].items():
        assert torch.equal(p, cb["model"][name]), name
    assert _untimed(ca["history"]) == _untimed(cb["history"])
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (a, b))
    assert ra["metrics"] == rb["metrics"]


def _interrupt_vdp_at(monkeypatch, stop):
    """Make Trainer.step die (like a killed process) when it is about to take step ``stop``."""
    from deqdiff.physics.training import Trainer

    real = Trainer.step

    def step(self):
        if self.step_count == stop:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(Trainer, "step", step)


@pytest.fixture(scope="module")
def vdp_straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("vdp") / "straight"
    assert _vdp(out) == 0
    return out


@pytest.mark.parametrize("stop", [1, 3, 4])  # mid-Adam, end of Adam (→ L-BFGS), mid-L-BFGS
def test_vdp_resume_at_every_boundary_is_bitwise(tmp_path, monkeypatch, vdp_straight, stop):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _interrupt_vdp_at(m, stop)
        with pytest.raises(KeyboardInterrupt):
            _vdp(out)
    assert _ckpt(out)["step"] == stop
    assert _vdp(out, "--resume") == 0
    _assert_same_vdp(vdp_straight, out)


def test_vdp_resume_with_more_lbfgs_steps_at_the_phase_boundary(tmp_path, vdp_straight):
    """A run that ended with its Adam phase (no L-BFGS) continues into L-BFGS exactly like a
    run configured with the L-BFGS steps from the start (a traceback before)."""
    out = tmp_path / "run"
    assert _vdp(out, "--lbfgs-steps", "0") == 0
    assert _vdp(out, "--resume", "--lbfgs-steps", "2") == 0
    _assert_same_vdp(vdp_straight, out)


def test_vdp_resume_with_another_epochs_reanneals_the_learning_rate(tmp_path, monkeypatch):
    """--epochs changed while in the Adam phase: the rate decays from where it was to --lr-final
    over the remaining epochs (the old schedule was kept silently before)."""
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _interrupt_vdp_at(m, 2)
        with pytest.raises(KeyboardInterrupt):
            _vdp(out, "--lbfgs-steps", "0", "--lr", "0.01", "--lr-final", "0.0001")
    lr_now = _ckpt(out)["optimizer"]["param_groups"][0]["lr"]
    assert _vdp(out, "--resume", "--lbfgs-steps", "0", "--lr", "0.01", "--lr-final", "0.0001", "--epochs", "6") == 0
    lrs = [h["lr"] for h in _ckpt(out)["history"]]
    g = (1e-4 / lr_now) ** (1 / 4)
    assert lrs[:2] == pytest.approx([1e-2, 1e-2 * 1e-2 ** (1 / 3)])
    assert lrs[2:] == pytest.approx([lr_now * g ** k for k in range(4)])
    assert _ckpt(out)["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-4)


@pytest.mark.parametrize("flags, message", [
    (["--lbfgs-steps", "1"], "--lbfgs-steps 1: the checkpoint has already taken 2 L-BFGS steps"),
    (["--epochs", "4"], "--epochs 4: the checkpoint is past its 3 Adam epochs"),
    (["--mu", "2"], "--resume: --mu 2.0 (checkpoint: 1.0)"),
    (["--width", "5"], "--resume: --width 5 (checkpoint: 4)"),
])
def test_vdp_resume_refuses_changes_it_cannot_continue(tmp_path, capsys, vdp_straight, flags, message):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(vdp_straight, out)
    assert _vdp(out, "--resume", *flags) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


HEAT = ["--states", "4", "--collocation", "16", "--initial-points", "4", "--boundary-points", "4", "--no-progress"]


def _pde(out, problem, *flags):
    return main(["pinn", problem, "--out", str(out), *HEAT, *flags])


@pytest.mark.parametrize("problem, stop", [("heat", 2), ("burgers", 3)])
def test_pde_runs_checkpoint_periodically_and_resume_bitwise(tmp_path, monkeypatch, problem, stop):
    """An interrupted burgers/heat run leaves its last periodic checkpoint; --resume from it
    ends bitwise where the uninterrupted run does."""
    from deqdiff.physics import burgers

    flags = ["--epochs", "4", "--checkpoint-every", "2"]
    assert _pde(tmp_path / "a", problem, *flags) == 0
    real, calls = burgers.pde_loss, []

    def loss(*args, **kw):  # dies when epoch `stop` (0-based) begins
        if len(calls) == stop:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kw)

    with monkeypatch.context() as m:
        m.setattr(burgers, "pde_loss", loss)
        with pytest.raises(KeyboardInterrupt):
            _pde(tmp_path / "b", problem, *flags)
    assert _ckpt(tmp_path / "b")["epoch"] == 2  # the last checkpoint before the interruption
    assert _pde(tmp_path / "b", problem, *flags, "--resume") == 0
    ca, cb = _ckpt(tmp_path / "a"), _ckpt(tmp_path / "b")
    for name, p in ca["model"].items():
        assert torch.equal(p, cb["model"][name]), name
    ra, rb = (json.loads((tmp_path / d / "results.json").read_text()) for d in "ab")
    assert ra["rel_l2"] == rb["rel_l2"] and ra["history"]["loss"] == rb["history"]["loss"]


def test_pde_resume_with_more_epochs_anneals_to_the_final_rate(tmp_path, capsys):
    out = tmp_path / "run"
    assert _pde(out, "heat", "--epochs", "2", "--lr", "0.01") == 0
    assert _pde(out, "heat", "--epochs", "4", "--lr", "0.01", "--resume") == 0
    ck = _ckpt(out)
    assert ck["epoch"] == 4 and ck["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.01 / 50)
    capsys.readouterr()
    assert _pde(out, "heat", "--epochs", "3", "--lr", "0.01", "--resume") == 2
    assert "--epochs 3: the checkpoint has already trained 4 epochs" in capsys.readouterr().err
