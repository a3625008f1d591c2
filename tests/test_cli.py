"""``deqdiff`` end to end: the demo job, and bad input everywhere is one line on stderr, a
nonzero exit code and no traceback (in-process through ``main``; one case as a subprocess)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from deqdiff.cli import main
from tests.data.test_datasets import make_cifar, make_mnist, write_idx


def test_demo_job_passes_its_derivative_checks(capsys):
    assert main(["demo", "--n", "6", "--batch", "3"]) == 0
    out = capsys.readouterr().out
    assert "order 3" in out and "FAIL" not in out


def _corrupt_mnist(root):
    make_mnist(root, n_train=2, n_test=2)
    write_idx(root / "train-images-idx3-ubyte", np.zeros((2, 28, 28)), magic=0x12345678)
    return root


def _truncated_mnist(root):
    make_mnist(root, n_train=2, n_test=2)
    f = root / "t10k-labels-idx1-ubyte"
    f.write_bytes(f.read_bytes()[:-1])
    return root


def _corrupt_cifar(root):
    make_cifar(root, n=2)
    (root / "data_batch_3").write_bytes(b"not a pickle")
    return root


def _file(root):
    (root / "plain.txt").write_text("x")
    return root / "plain.txt"


def _checkpoint(root, text=b"garbage"):
    (root / "run").mkdir()
    (root / "run" / "checkpoint.pt").write_bytes(text)
    return root / "run"


# (argv builder given tmp_path, a fragment the one-line message must hold: the flag, the file …)
BAD = {
    # train: numbers, names, data, files
    "train epochs 0": (lambda t: ["train", "--epochs", "0"], "--epochs"),
    "train lr nan": (lambda t: ["train", "--lr", "nan"], "--lr"),
    "train lr negative": (lambda t: ["train", "--lr", "-1e-3"], "--lr"),
    "train batch 0": (lambda t: ["train", "--batch-size", "0"], "--batch-size"),
    "train tol 0": (lambda t: ["train", "--tol", "0"], "--tol"),
    "train jac-reg inf": (lambda t: ["train", "--jac-reg", "inf"], "--jac-reg"),
    "train seed negative": (lambda t: ["train", "--seed", "-1"], "--seed"),
    "train max-steps negative": (lambda t: ["train", "--max-steps", "-2"], "--max-steps"),
    "train epochs float": (lambda t: ["train", "--epochs", "1.5"], "--epochs"),
    "train unknown model": (lambda t: ["train", "--model", "resnet", "--out", str(t / "o")], "--model"),
    "train unknown solver": (lambda t: ["train", "--solver", "sgd", "--out", str(t / "o")], "--solver"),
    "train groups": (lambda t: ["train", "--channels", "5", "--groups", "2", "--out", str(t / "o")], "--model conv"),
    "train bad device": (lambda t: ["train", "--device", "gpu0", "--out", str(t / "o")], "--device"),
    "train mnist no dir": (lambda t: ["train", "--data", "mnist", "--out", str(t / "o")], "--data-dir"),
    "train mnist missing dir": (lambda t: ["train", "--data", "mnist", "--data-dir", str(t / "none"), "--out", str(t / "o")],
                                "MNIST directory not found"),
    "train mnist corrupt idx": (lambda t: ["train", "--data", "mnist", "--data-dir", str(_corrupt_mnist(t)),
                                           "--out", str(t / "o")], "train-images-idx3-ubyte"),
    "train mnist truncated idx": (lambda t: ["train", "--data", "mnist", "--data-dir", str(_truncated_mnist(t)),
                                             "--out", str(t / "o")], "t10k-labels-idx1-ubyte"),
    "train cifar corrupt": (lambda t: ["train", "--data", "cifar10", "--data-dir", str(_corrupt_cifar(t)),
                                       "--out", str(t / "o")], "data_batch_3"),
    "train out is a file": (lambda t: ["train", "--out", str(_file(t))], "--out"),
    "train out under a file": (lambda t: ["train", "--out", str(_file(t) / "run")], "--out"),
    "train out unwritable": (lambda t: ["train", "--out", "/proc/deqdiff-test/run"], "--out"),
    "train resume none": (lambda t: ["train", "--resume", "--out", str(t / "o")], "--resume"),
    "train resume corrupt": (lambda t: ["train", "--resume", "--out", str(_checkpoint(t))], "--resume"),
    # pinn: the three problems
    "burgers T": (lambda t: ["pinn", "burgers", "--T", "-1"], "--T"),
    "heat nu": (lambda t: ["pinn", "heat", "--nu", "nan"], "--nu"),
    "burgers states": (lambda t: ["pinn", "burgers", "--states", "0"], "--states"),
    "burgers collocation": (lambda t: ["pinn", "burgers", "--collocation", "-4"], "--collocation"),
    "burgers epochs": (lambda t: ["pinn", "burgers", "--epochs", "-1"], "--epochs"),
    "burgers lr": (lambda t: ["pinn", "burgers", "--lr", "inf"], "--lr"),
    "burgers kappa": (lambda t: ["pinn", "burgers", "--kappa", "-1"], "--kappa"),
    "burgers solver": (lambda t: ["pinn", "burgers", "--solver", "nope", "--out", str(t / "o")], "--solver"),
    "burgers out file": (lambda t: ["pinn", "burgers", "--out", str(_file(t))], "--out"),
    "heat resume none": (lambda t: ["pinn", "heat", "--resume", "--out", str(t / "o")], "--resume"),
    "heat resume corrupt": (lambda t: ["pinn", "heat", "--resume", "--out", str(_checkpoint(t))], "--resume"),
    "heat checkpoint-every": (lambda t: ["pinn", "heat", "--checkpoint-every", "-1"], "--checkpoint-every"),
    "vdp horizon": (lambda t: ["pinn", "vdp", "--horizon", "-1"], "--horizon"),
    "vdp mu": (lambda t: ["pinn", "vdp", "--mu", "nan"], "--mu"),
    "vdp epochs": (lambda t: ["pinn", "vdp", "--epochs", "-3"], "--epochs"),
    "vdp weight": (lambda t: ["pinn", "vdp", "--jacobian-weight", "-1"], "--jacobian-weight"),
    "vdp threads": (lambda t: ["pinn", "vdp", "--threads", "-1"], "--threads"),
    "vdp solver": (lambda t: ["pinn", "vdp", "--solver", "nope", "--out", str(t / "o")], "--solver"),
    "vdp device": (lambda t: ["pinn", "vdp", "--device", "gpu", "--out", str(t / "o")], "--device"),
    "vdp out file": (lambda t: ["pinn", "vdp", "--out", str(_file(t))], "--out"),
    "vdp resume corrupt": (lambda t: ["pinn", "vdp", "--resume", str(_file(t)), "--out", str(t / "o")], "--resume"),
    "pinn unknown problem": (lambda t: ["pinn", "lorenz"], "lorenz"),
    # analyze: every tool
    "residuals epochs": (lambda t: ["analyze", "residuals", "--epochs", "1,-1"], "--epochs"),
    "residuals solvers": (lambda t: ["analyze", "residuals", "--solvers", "anderson,nope", "--out", str(t / "o")],
                          "--solvers"),
    "residuals mnist": (lambda t: ["analyze", "residuals", "--data", "mnist", "--data-dir", str(_corrupt_mnist(t)),
                                   "--out", str(t / "o")], "train-images-idx3-ubyte"),
    "trajectories model": (lambda t: ["analyze", "trajectories", "--model", "vgg", "--out", str(t / "o")], "--model"),
    "trajectories out": (lambda t: ["analyze", "trajectories", "--out", str(_file(t))], "--out"),
    "ntk rate-m": (lambda t: ["analyze", "ntk", "--rate-m", "0"], "--rate-m"),
    "ntk lr": (lambda t: ["analyze", "ntk", "--lr", "nan"], "--lr"),
    "hessian k": (lambda t: ["analyze", "hessian", "--k", "0"], "--k"),
    "landscape steps": (lambda t: ["analyze", "landscape", "--steps", "4"], "--steps"),
    "landscape span": (lambda t: ["analyze", "landscape", "--span", "1", "-1", "--out", str(t / "o")], "--span"),
    "landscape models": (lambda t: ["analyze", "landscape", "--models", "conv,vgg", "--out", str(t / "o")], "--models"),
    "analyze no tool": (lambda t: ["analyze"], "tool"),
    # demo and the top level
    "demo rho": (lambda t: ["demo", "--rho", "1.5"], "--rho"),
    "demo n": (lambda t: ["demo", "--n", "0"], "--n"),
    "demo solver": (lambda t: ["demo", "--solver", "nope"], "--solver"),
    "unknown job": (lambda t: ["fly"], "fly"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_without_traceback(tmp_path, capsys, case):
    argv, fragment = BAD[case]
    argv = argv(tmp_path)
    try:
        code = main([*argv, "--no-progress"] if argv[0] in ("train", "pinn") and len(argv) > 2 else argv)
    except SystemExit as exc:  # argparse's own errors exit
        code = exc.code
    err = capsys.readouterr().err
    assert code not in (0, None)
    assert err.count("\n") == 1 and err.startswith("deqdiff") and ": error: " in err, err
    assert "Traceback" not in err and fragment in err, err


def test_genuine_bugs_are_not_swallowed(tmp_path, monkeypatch):
    """Only input errors become one-liners: an error from inside training still propagates."""
    import deqdiff.training.trainer as trainer

    def broken(*args, **kw):
        raise ValueError("a bug inside training")

    monkeypatch.setattr(trainer, "evaluate", broken)
    with pytest.raises(ValueError, match="a bug inside training"):
        main(["train", "--out", str(tmp_path), "--epochs", "1", "--train-limit", "8", "--test-limit", "4",
              "--channels", "4", "--hidden", "4", "--groups", "2", "--no-progress"])


@pytest.mark.parametrize("argv", [["train", "--epochs", "0"], ["pinn", "heat", "--nu", "nan"]])
def test_bad_input_from_the_shell(tmp_path, argv):
    r = subprocess.run([sys.executable, "-m", "deqdiff.cli", *argv], capture_output=True, text=True, cwd=tmp_path,
                       timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr and r.stderr.startswith(f"deqdiff {argv[0]}")
