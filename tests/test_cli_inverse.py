"""``deqdiff inverse``: a tiny run writes its JSON, figures and checkpoint and resumes; every bad
input is one line on stderr with exit code 2."""

from __future__ import annotations

import json

import pytest

from deqdiff.cli import main

TINY = ["--size", "native", "--train-limit", "16", "--test-limit", "8", "--hidden", "4", "--k", "2",
        "--batch-size", "8", "--epochs", "1", "--no-progress"]


def test_run_writes_results_figures_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["inverse", "deblur", "--out", str(out), "--max-steps", "1", *TINY]) == 0
    assert json.loads(capsys.readouterr().out)["finished"] is False
    assert main(["inverse", "deblur", "--out", str(out), "--resume", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "resuming from" in printed and "deq" in printed and "unrolled" in printed
    res = json.loads((out / "results.json").read_text())
    report = res["report"]
    assert res["config"]["task"] == "deblur" and report["test_images"] == 8
    deq, unr = report["models"]["deq"], report["models"]["unrolled"]
    assert set(deq["extra_iterations"]) == set(unr["extra_iterations"]) == {"1", "2", "4"}
    assert unr["extra_iterations"]["4"]["iterations"] == 8 and deq["extra_iterations"]["2"]["max_iter"] == 100
    assert len(deq["plain_iteration_psnr"]) == len(report["curve_iterations"]) == 9
    assert deq["fwd_converged"] == 1.0 and deq["fwd_res_max"] <= 1e-3
    assert deq["step_memory"]["saved_mib"] < unr["step_memory"]["saved_mib"]
    for name in ("examples.png", "psnr_vs_iterations.png", "training.png", "checkpoint.pt"):
        assert (out / name).stat().st_size > 0, name


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err.strip()


@pytest.mark.parametrize("argv,expected", [
    (["inverse", "inpaint"], "argument task: invalid choice"),
    (["inverse", "deblur", "--size", "1"], "--size: expected an integer >= 2 or 'native'"),
    (["inverse", "deblur", "--blur-size", "4"], "--blur-size: expected an odd integer"),
    (["inverse", "deblur", "--models", "deq,resnet"], "--models: expected distinct names"),
    (["inverse", "deblur", "--noise", "nan"], "--noise: expected a finite number"),
    (["inverse", "denoise", "--solver", "newton"], "--solver newton: unknown solver"),
    (["inverse", "denoise", "--backward-solver", "lu"], "--backward-solver lu: unknown linear solver"),
    (["inverse", "deblur", "--device", "tpu"], "--device tpu"),
])
def test_bad_flags_are_one_line(tmp_path, capsys, argv, expected):
    code = None
    try:
        code = main([*argv, "--out", str(tmp_path / "x")])
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    assert code == 2
    assert expected in _err(capsys)


def test_bad_data_and_resume_are_one_line(tmp_path, capsys):
    assert main(["inverse", "deblur", "--data", "mnist", "--data-dir", str(tmp_path / "none"),
                 "--out", str(tmp_path / "a")]) == 2
    assert "--data mnist: MNIST directory not found" in _err(capsys)
    assert main(["inverse", "deblur", "--resume", "--out", str(tmp_path / "b")]) == 2
    assert _err(capsys) == f"deqdiff inverse deblur: error: --resume: no checkpoint at {tmp_path / 'b' / 'checkpoint.pt'}"
    (tmp_path / "file").write_text("")
    assert main(["inverse", "deblur", "--out", str(tmp_path / "file"), *TINY]) == 2
    assert "--out" in _err(capsys)
    out = tmp_path / "c"
    assert main(["inverse", "denoise", "--out", str(out), "--max-steps", "1", *TINY]) == 0
    capsys.readouterr()
    assert main(["inverse", "denoise", "--out", str(out), "--resume", "--lr", "0.5"]) == 2
    assert "--resume: --lr 0.5 (checkpoint: 0.001)" in _err(capsys)
    assert main(["inverse", "deblur", "--out", str(out), "--resume"]) == 2
    assert "the task deblur (checkpoint: denoise)" in _err(capsys)
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert main(["inverse", "denoise", "--out", str(out), "--resume"]) == 2
    assert "--resume:" in _err(capsys)


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["inverse", "-h"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # help wraps lines
    assert "deblur" in text and "(default: 5)" in text and "(default: 0.01 deblur, 0.2 denoise)" in text


@pytest.mark.slow
def test_cli_under_torchrun(tmp_path):
    import os
    import shutil
    import subprocess

    if shutil.which("torchrun") is None:
        pytest.skip("torchrun not on PATH")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = ["torchrun", "--nproc_per_node=2", "--no-python", "deqdiff", "inverse", "denoise", "--out", str(tmp_path),
           *TINY]
    subprocess.run(cmd, check=True, env=env, timeout=600)
    assert json.loads((tmp_path / "results.json").read_text())["report"]["test_images"] == 8
