"""``deqdiff train`` smoke run: tiny settings, metrics and checkpoint on disk, --resume."""

from __future__ import annotations

import json


from deqdiff.cli import main
from deqdiff.training import load_checkpoint

TINY = ["--data", "digits", "--train-limit", "64", "--test-limit", "32", "--batch-size", "16",
        "--channels", "4", "--hidden", "4", "--groups", "2", "--no-progress"]


def test_train_cli_writes_metrics_checkpoint_and_resumes(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["train", "--model", "conv", "--epochs", "2", "--max-steps", "4", "--out", out, *TINY]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 4 and summary["final"]["epoch"] == 1
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["config"]["model"] == "conv" and len(metrics["steps"]) == 4
    assert {"fwd_iter_mean", "fwd_iter_max", "fwd_res_max"} <= set(metrics["epochs"][0]["test"])
    assert main(["train", "--resume", "--epochs", "2", "--max-steps", "none", "--out", out, *TINY]) == 0
    out_text = capsys.readouterr().out
    assert "resuming from" in out_text
    loaded = load_checkpoint(tmp_path / "run")
    assert loaded.state["step"] == 8 and len(loaded.history["epochs"]) == 2
    assert (tmp_path / "run" / "training.png").stat().st_size > 10_000  # loss, accuracy, iterations


def test_training_curves_drawn_from_a_history(tmp_path):
    import matplotlib.image

    from deqdiff.training.plots import plot_training_curves

    rec = lambda e, loss, acc: {"epoch": e, "train": {"loss": loss, "acc": acc, "fwd_iter_mean": 7.0, "fwd_iter_max": 12},
                                "test": {"loss": loss * 1.1, "acc": acc - 0.01, "fwd_iter_mean": 7.5}}  # noqa: E731
    history = {"steps": [{"step": i + 1, "loss": 2.0 / (i + 1)} for i in range(6)],
               "epochs": [rec(1, 1.0, 0.8), rec(2, 0.5, 0.9), rec(3, 0.3, 0.95)]}
    path = plot_training_curves(history, tmp_path / "t.png")
    assert matplotlib.image.imread(path).shape[1] > 1000


def test_train_cli_repeat_k_and_bad_inputs(tmp_path, capsys):
    assert main(["train", "--model", "repeat-3", "--epochs", "1", "--out", str(tmp_path), *TINY]) == 0
    assert "fwd_iter_mean" not in json.loads(capsys.readouterr().out)["final"]["test"]
    assert main(["train", "--model", "resnet", "--out", str(tmp_path / "x"), *TINY]) == 2
    assert "deqdiff train: error: --model: unknown model 'resnet'" in capsys.readouterr().err
    assert main(["train", "--data", "mnist", "--data-dir", str(tmp_path / "missing"), "--out", str(tmp_path / "y")]) == 2
    assert "--data mnist: MNIST directory not found" in capsys.readouterr().err


def _train(tmp_path, *flags):
    return main(["train", "--out", str(tmp_path / "run"), *TINY, *flags])


def test_resume_without_a_checkpoint_is_an_error(tmp_path, capsys):
    assert _train(tmp_path, "--resume") == 2
    err = capsys.readouterr().err.strip()
    assert err == f"deqdiff train: error: --resume: no checkpoint at {tmp_path / 'run' / 'checkpoint.pt'}"
    assert not (tmp_path / "run" / "metrics.json").exists()  # nothing was trained


def test_resume_keeps_the_runs_settings_and_refuses_changed_ones(tmp_path, capsys):
    assert _train(tmp_path, "--epochs", "2", "--max-steps", "4", "--lr", "0.01") == 0
    capsys.readouterr()
    assert _train(tmp_path, "--resume", "--epochs", "3") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--resume: --epochs 3 (checkpoint: 2)" in err
    # not given: the checkpoint's settings (lr 0.01, 2 epochs), no step limit
    assert _train(tmp_path, "--resume", "--epochs", "2") == 0
    loaded = load_checkpoint(tmp_path / "run")
    assert loaded.config.lr == 0.01 and loaded.state["step"] == 8
