"""``deqdiff operator darcy``: one run end to end (JSON, figures, checkpoint), bit-exact resume at
every kind of boundary (within a model's training, between the two models, after the end),
noise robustness and memory accounting, and one-line errors for bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch

from deqdiff.cli import main
from deqdiff.physics.neural_operator import (OPERATOR_FORMAT, OperatorConfig, build_model, evaluate, noise_robustness,
                                             read_checkpoint, resume_state, run, saved_activation_bytes)

TINY = dict(n_train=8, n_test=4, resolution=8, width=4, modes=2, projection=6, k=3, epochs=2, batch=4,
            noise=[0.0, 0.3], dtype="float64")
FLAGS = ["--n-train", "8", "--n-test", "4", "--resolution", "8", "--width", "4", "--modes", "2", "--projection", "6",
         "--k", "3", "--epochs", "2", "--batch", "4", "--noise", "0,0.3", "--dtype", "float64", "--no-progress"]


def final_states(out) -> dict:
    state = read_checkpoint(out / "checkpoint.pt", format=OPERATOR_FORMAT)
    return {name: blob["model"] for name, blob in state["done"].items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n][k], b[n][k]) for n in a for k in a[n])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    res = run(OperatorConfig(**TINY), out, progress=False, plots=False)
    return out, res


def test_cli_run_writes_results_figures_and_checkpoint(tmp_path, capsys):
    assert main(["operator", "darcy", "--out", str(tmp_path), *FLAGS, "--cache"]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert set(res["models"]) == {"deq", "explicit"}
    deq, exp = res["models"]["deq"], res["models"]["explicit"]
    assert deq["parameters"] == exp["parameters"]  # weight-tied: equal parameters
    for m in (deq, exp):
        assert math.isfinite(m["held_out"]["rel_l2"]) and [r["noise"] for r in m["noise"]] == [0.0, 0.3]
        assert m["held_out"]["rel_l2"] == m["noise"][0]["rel_l2"]
        assert len(m["history"]["test_rel_l2"]) == 2
    assert deq["held_out"]["forward_iters_mean"] > 0
    assert {p.split("/")[-1] for p in res["figures"]} == {"darcy_fields.png", "darcy_noise.png", "darcy_training.png"}
    assert all((tmp_path / p.split("/")[-1]).stat().st_size > 1000 for p in res["figures"])
    assert (tmp_path / "darcy_data.npz").is_file()
    assert "held-out relative L2" in capsys.readouterr().out


@pytest.mark.parametrize("until", [("deq", 1), ("explicit", 0), ("explicit", 1)],
                         ids=["within-deq", "between-models", "within-explicit"])
def test_resume_is_bit_exact(tmp_path, reference, until):
    ref_out, ref_res = reference
    cfg = OperatorConfig(**TINY)
    assert "stopped" in run(cfg, tmp_path, progress=False, plots=False, until=until)
    res = run(cfg, tmp_path, state=resume_state(cfg, tmp_path / "checkpoint.pt"), progress=False, plots=False)
    assert same(final_states(tmp_path), final_states(ref_out))
    for name in ("deq", "explicit"):
        assert res["models"][name]["held_out"] == ref_res["models"][name]["held_out"]
        assert res["models"][name]["history"]["train_loss"] == ref_res["models"][name]["history"]["train_loss"]


def test_resume_after_the_end_reports_the_same(tmp_path, reference):
    ref_out, ref_res = reference
    cfg = OperatorConfig(**TINY)
    res = run(cfg, ref_out, state=resume_state(cfg, ref_out / "checkpoint.pt"), progress=False, plots=False)
    assert res["models"]["deq"]["held_out"] == ref_res["models"]["deq"]["held_out"]


def test_noise_robustness_uses_the_same_noise_for_every_model_and_zero_is_clean():
    cfg = OperatorConfig(**TINY)
    a = 3 + 9 * torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    u = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(1))
    model = build_model(cfg, "explicit")
    rows = noise_robustness(model, a, u, [0.0, 0.5], seed=4)
    assert rows[0]["rel_l2"] == evaluate(model, a, u)["rel_l2"]
    assert rows[1]["rel_l2"] != rows[0]["rel_l2"]
    assert noise_robustness(model, a, u, [0.0, 0.5], seed=4) == rows  # deterministic


def test_saved_activations_grow_with_k_for_the_explicit_fno_only():
    a = 3 + 9 * torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(0))
    u = torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(1))
    sizes = {}
    for k in (2, 8):
        cfg = OperatorConfig(**{**TINY, "k": k, "max_iter": 4 * k, "tol": 1e-12})
        sizes[k] = {n: saved_activation_bytes(build_model(cfg, n), a, u) for n in ("deq", "explicit")}
    assert sizes[8]["deq"] == sizes[2]["deq"]  # the implicit model keeps no iterates
    assert sizes[8]["explicit"] > 2 * sizes[2]["explicit"] > 0
    assert sizes[8]["explicit"] > 3 * sizes[8]["deq"]


def _one_line_error(capsys, argv) -> str:
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's errors exit from the parser
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("extra,needle", [
    (["--modes", "5"], "--modes"),
    (["--batch", "9"], "--batch"),
    (["--noise", "0,-1"], "--noise"),
    (["--models", "deq,mlp"], "--models"),
    (["--lr", "nan"], "--lr"),
    (["--solver", "nosuch"], "--solver"),
    (["--device", "tpu"], "--device"),
    (["--epochs", "0"], "--epochs"),
    (["--resume"], "--resume"),
])
def test_bad_flags_are_one_line_errors(tmp_path, capsys, extra, needle):
    err = _one_line_error(capsys, ["operator", "darcy", "--out", str(tmp_path / "o"), *FLAGS, *extra])
    assert needle in err and err.startswith("deqdiff operator")


def test_bad_files_are_one_line_errors(tmp_path, capsys, reference):
    ref_out, _ = reference
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    assert "--resume" in _one_line_error(capsys, ["operator", "darcy", "--out", str(tmp_path), *FLAGS, "--resume", str(bad)])
    changed = [*FLAGS[:-1], "--width", "5", "--no-progress"]
    err = _one_line_error(capsys, ["operator", "darcy", "--out", str(tmp_path), *changed, "--resume", str(ref_out / "checkpoint.pt")])
    assert "--width 5 (checkpoint: 4)" in err
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "darcy_data.npz").write_bytes(b"not numpy")
    assert "--cache" in _one_line_error(capsys, ["operator", "darcy", "--out", str(tmp_path / "c"), *FLAGS, "--cache"])
    (tmp_path / "file").write_text("x")
    assert "--out" in _one_line_error(capsys, ["operator", "darcy", "--out", str(tmp_path / "file"), *FLAGS])


def test_unconverged_solves_are_counted_with_their_residual():
    cfg = OperatorConfig(**{**TINY, "max_iter": 1, "tol": 1e-12})
    a = 3 + 9 * torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    ev = evaluate(build_model(cfg, "deq"), a, torch.rand(3, 8, 8))
    assert ev["unconverged_forward_rows"] == 3 and ev["worst_forward_rel_residual"] > 1e-12
    assert ev["forward_iters_max"] == 1
