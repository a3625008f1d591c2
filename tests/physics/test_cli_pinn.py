"""``deqdiff pinn``: a tiny end-to-end run, resume, and clear errors for bad input."""

from __future__ import annotations

import json

import pytest

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
