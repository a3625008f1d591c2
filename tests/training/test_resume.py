"""Checkpoint → resume continues bit-exactly: N steps straight equal N/2 + save + resume N/2."""

from __future__ import annotations

import json

import pytest
import torch

from deqdiff.training import TrainConfig, load_checkpoint, read_checkpoint, train
from tests.training.helpers import tiny_config, tiny_data


def _strip_times(history):
    return {"steps": history["steps"], "epochs": [{k: v for k, v in e.items() if k != "time_s"} for e in history["epochs"]]}


@pytest.mark.parametrize("model,jac_reg", [("conv", 0.5), ("repeat-2", 0.0)])
def test_resume_is_bit_exact(tmp_path, model, jac_reg):
    data = tiny_data()  # 5 steps per epoch: resume mid-epoch 2 (step 7 of 9)
    straight = train(tiny_config(model=model, jac_reg=jac_reg, max_steps=9, out=str(tmp_path / "a")), data)
    first = train(tiny_config(model=model, jac_reg=jac_reg, max_steps=7, out=str(tmp_path / "b")), data)
    assert first.steps == 7 and read_checkpoint(tmp_path / "b")["step_in_epoch"] == 2
    resumed = train(tiny_config(model=model, jac_reg=jac_reg, max_steps=9, out=str(tmp_path / "b")), data, resume=True)
    assert resumed.steps == straight.steps == 9
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert _strip_times(resumed.history) == _strip_times(straight.history)
    if jac_reg:
        assert "jac_frobenius" in straight.history["steps"][-1]
    metrics = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert len(metrics["steps"]) == 9 and metrics["epochs"][0]["epoch"] == 1


def test_resume_refuses_changed_settings_and_loads_models(tmp_path):
    data = tiny_data()
    run = train(tiny_config(max_steps=2, out=str(tmp_path)), data)
    with pytest.raises(ValueError, match=r"settings \['lr'\] differ"):
        train(tiny_config(max_steps=4, lr=0.5, out=str(tmp_path)), data, resume=True)
    loaded = load_checkpoint(tmp_path)
    assert isinstance(loaded.config, TrainConfig) and loaded.config.model == "conv"
    x = data.images("test", slice(None))
    run.model.eval()
    with torch.no_grad():
        assert torch.equal(loaded.model(x), run.model(x))
    assert loaded.model.deq.last_info.forward is not None


def test_training_learns_and_reports_solver_statistics():
    result = train(tiny_config(epochs=3), tiny_data())
    first, last = result.history["epochs"][0], result.final
    assert last["train"]["loss"] < first["train"]["loss"]
    for key in ("fwd_iter_mean", "fwd_iter_max", "fwd_res_max", "fwd_converged", "bwd_iter_mean"):
        assert key in last["train"], key
    assert last["test"]["fwd_res_max"] <= 1e-4 and last["test"]["fwd_converged"] == 1.0
    lrs = [s["lr"] for s in result.history["steps"]]
    assert lrs[0] == pytest.approx(1e-2) and lrs[-1] < 1e-3  # cosine annealing to ~0 over the run


@pytest.mark.parametrize("model", ["mon", "mon-conv"])
def test_monotone_models_train_through_the_same_loop(model):
    pytest.importorskip("deqdiff.models.monotone")
    config = tiny_config(model=model, width=4, pool=2, max_steps=2, jac_reg=0.1, tol=None, max_iter=None)
    assert config.lr == 3e-3
    result = train(config, tiny_data())
    step = result.history["steps"][-1]
    assert step["fwd_iter_mean"] > 0 and step["fwd_converged"] == 1.0 and "jac_frobenius" in step
    assert hasattr(result.model, "deq")
