"""Checkpoint → resume continues bit-exactly: N steps straight equal N/2 + save + resume N/2."""

from __future__ import annotations

import json

import pytest
import torch

from deqdiff.training import TrainConfig, load_checkpoint, read_checkpoint, train
from tests.training.helpers import tiny_config, tiny_data


def _strip_times(history):
    times = ("time_s", "cpu_time_s")
    return {"steps": history["steps"], "epochs": [{k: v for k, v in e.items() if k not in times} for e in history["epochs"]]}


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


def _assert_same_run(a, b):
    for (name, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(p, q), name
    assert _strip_times(a.history) == _strip_times(b.history)


@pytest.mark.parametrize("stop", [5, 10, 11])  # end of epoch 1, end of epoch 2, first step of epoch 3
def test_resume_at_every_epoch_boundary_is_bit_exact(tmp_path, stop):
    """5 steps per epoch: a checkpoint taken as an epoch ends (the default cadence) must
    continue with the next epoch's own data order, not a re-seeded one."""
    data = tiny_data()
    straight = train(tiny_config(epochs=3, out=str(tmp_path / "a")), data)
    train(tiny_config(epochs=3, max_steps=stop, out=str(tmp_path / "b")), data)
    assert read_checkpoint(tmp_path / "b")["step_in_epoch"] == (1 if stop == 11 else 0)
    resumed = train(tiny_config(epochs=3, out=str(tmp_path / "b")), data, resume=True)
    assert resumed.steps == straight.steps == 15
    _assert_same_run(straight, resumed)


def test_checkpoints_without_the_current_loader_state_resume_exactly(tmp_path):
    """Checkpoints written before the loader's current state was saved replay its draws."""
    data = tiny_data()
    straight = train(tiny_config(out=str(tmp_path / "a")), data)
    train(tiny_config(max_steps=5, out=str(tmp_path / "b")), data)
    state = read_checkpoint(tmp_path / "b")
    del state["loader"]["current"]
    torch.save(state, tmp_path / "b" / "checkpoint.pt")
    _assert_same_run(straight, train(tiny_config(out=str(tmp_path / "b")), data, resume=True))


def test_resume_after_a_crash_in_the_end_of_epoch_evaluation(tmp_path, monkeypatch):
    """``checkpoint_every`` saves after an epoch's last step, before its evaluation: a run that
    dies there resumes into the evaluation and the next epoch exactly."""
    import deqdiff.training.trainer as trainer

    data = tiny_data()
    straight = train(tiny_config(out=str(tmp_path / "a"), checkpoint_every=5), data)
    real = trainer.evaluate

    def dies(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "evaluate", dies)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(out=str(tmp_path / "b"), checkpoint_every=5), data)
    state = read_checkpoint(tmp_path / "b")
    assert (state["step"], state["step_in_epoch"], state["history"]["epochs"]) == (5, 5, [])
    monkeypatch.setattr(trainer, "evaluate", real)
    _assert_same_run(straight, train(tiny_config(out=str(tmp_path / "b"), checkpoint_every=5), data, resume=True))


def test_staged_analysis_snapshots_equal_continuous_training(tmp_path):
    """The analyses' cached models train in stages (one resume per requested epoch): each
    snapshot must equal the model of one uninterrupted run at that epoch, bit for bit."""
    from deqdiff.analysis.runs import trained_snapshots

    settings = dict(channels=4, hidden=4, groups=2, train_limit=40, test_limit=8, batch_size=16, lr=1e-2, tol=1e-4,
                    max_iter=30)
    snaps = trained_snapshots("conv", [0, 1, 3], tmp_path / "cache", log=lambda *_: None, **settings)
    for epochs in (1, 3):
        straight = train(TrainConfig(model="conv", epochs=3, max_steps=3 * epochs, progress=False, **settings))
        for (name, p), q in zip(straight.model.state_dict().items(), snaps[epochs].state_dict().values()):
            assert torch.equal(p, q), (epochs, name)
