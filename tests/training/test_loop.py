"""The shared resumable epoch loop (deqdiff.training.loop) on a toy least-squares run: a run
stopped after any step and resumed from its checkpoint equals the uninterrupted run bit for bit
(parameters, momentum, per-step and per-epoch records), also after a crash in an epoch's
evaluation and from checkpoints without the generator's current state."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from deqdiff.training.distributed import DistContext
from deqdiff.training.loop import ResumableRun, train_epochs
from deqdiff.training.metrics import Meter

# 10 samples in batches of 4: steps of 4, 4 and 2 samples, 3 steps per epoch, 9 in 3 epochs
N, BATCH, EPOCHS = 10, 4, 3


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N + 5, 3, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64) + 0.1 * torch.randn(N + 5, 1, generator=g,
                                                                                          dtype=torch.float64)
    return x, y


class _Toy(ResumableRun):
    """Least squares with clipped SGD + momentum and a step schedule: the optimizer and
    schedule states and the sample order all matter."""

    label = "toy "

    def __init__(self, max_steps=None, checkpoint_every=0, fail_eval=False):
        self.config = SimpleNamespace(epochs=EPOCHS, batch_size=BATCH, seed=3, max_steps=max_steps,
                                      checkpoint_every=checkpoint_every, grad_clip=0.5)
        self.ctx = DistContext()
        torch.manual_seed(0)
        self.model = nn.Linear(3, 1).double()
        self.start(N)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=4, gamma=0.5)
        self.x, self.y = _data()
        self.fail_eval = fail_eval
        self.calls = {"begin_epoch": 0, "end_steps": 0}
        self.saved: list[dict] = []

    def train_step(self, global_size, idx):
        meter = Meter()
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = (self.model(self.x[idx]) - self.y[idx]).pow(2).sum()
        (loss_sum / global_size).backward()
        self.optimizer_step()
        meter.add_batch(float(loss_sum.detach()), 0, idx.numel())
        return meter

    def end_epoch(self):
        if self.fail_eval:
            raise KeyboardInterrupt
        with torch.no_grad():
            return {"test": {"loss": float((self.model(self.x[N:]) - self.y[N:]).pow(2).mean())}}

    def begin_epoch(self):
        self.calls["begin_epoch"] += 1

    def end_steps(self):
        self.calls["end_steps"] += 1

    def state(self) -> dict:
        return copy.deepcopy({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                              "scheduler": self.scheduler.state_dict(), **self.position_state()})

    def restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.restore_position(copy.deepcopy(state))

    def save(self) -> None:
        self.saved.append(self.state())

    def train(self, show=False) -> "_Toy":
        train_epochs(self, self.save, show=show)
        self.save()  # as the trainers do after the loop
        return self


def _strip(history):
    return {"steps": history["steps"], "epochs": [{k: v for k, v in e.items() if k != "time_s"} for e in history["epochs"]]}


def _assert_same(a: _Toy, b: _Toy):
    for (name, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(p, q), name
    for p, q in zip(a.optimizer.state_dict()["state"].values(), b.optimizer.state_dict()["state"].values()):
        assert torch.equal(p["momentum_buffer"], q["momentum_buffer"])
    assert _strip(a.history) == _strip(b.history)
    assert (a.epoch, a.step, a.step_in_epoch) == (b.epoch, b.step, b.step_in_epoch)


def test_uninterrupted_run_records_every_step_and_epoch():
    run = _Toy().train()
    assert run.steps_per_epoch == 3 and run.step == run.limit == 9 and run.done
    steps = run.history["steps"]
    assert [s["step"] for s in steps] == list(range(1, 10))
    assert [s["epoch"] for s in steps] == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert [s["samples"] for s in steps] == [4, 4, 2] * 3
    assert [s["lr"] for s in steps] == [0.05] * 4 + [0.025] * 4 + [0.0125]  # the rate each step used
    epochs = run.history["epochs"]
    assert [(e["epoch"], e["step"], e["train"]["samples"]) for e in epochs] == [(1, 3, 10), (2, 6, 10), (3, 9, 10)]
    # the epoch's train loss is the sample mean of its steps' losses
    for e, k in zip(epochs, range(0, 9, 3)):
        mean = sum(s["loss"] * s["samples"] for s in steps[k:k + 3]) / 10
        assert e["train"]["loss"] == pytest.approx(mean, rel=1e-12)
        assert e["time_s"] >= 0
    assert epochs[-1]["test"]["loss"] < epochs[0]["test"]["loss"]
    assert run.calls == {"begin_epoch": 3, "end_steps": 3}
    # every epoch draws a new permutation of all samples from the seeded generator
    orders = []
    probe = _Toy()
    for _ in range(EPOCHS):
        orders.append(torch.cat([idx for _, idx in probe.batches.epoch()]))
    assert all(sorted(o.tolist()) == list(range(N)) for o in orders)
    assert not torch.equal(orders[0], orders[1])


@pytest.mark.parametrize("stop", range(1, 9))  # after every step: mid-epoch and at both epoch boundaries
def test_resume_after_any_step_is_bit_exact(stop):
    straight = _Toy().train()
    first = _Toy(max_steps=stop).train()
    assert first.step == stop and len(first.history["steps"]) == stop
    assert first.saved[-1]["step_in_epoch"] == stop % 3
    resumed = _Toy()
    resumed.restore(first.saved[-1])
    _assert_same(straight, resumed.train())


def test_checkpoint_cadence():
    run = _Toy(checkpoint_every=2).train()
    # every 2 steps, after every epoch's evaluation, and once after the loop
    assert [s["step"] for s in run.saved] == [2, 3, 4, 6, 6, 8, 9, 9]
    assert [len(s["history"]["epochs"]) for s in run.saved] == [0, 1, 1, 1, 2, 2, 3, 3]


def test_resume_after_a_crash_in_the_epoch_evaluation():
    """Saved after an epoch's last step, before its evaluation: the resumed run evaluates that
    epoch and goes on exactly."""
    straight = _Toy().train()
    crashed = _Toy(checkpoint_every=3, fail_eval=True)
    with pytest.raises(KeyboardInterrupt):
        crashed.train()
    state = crashed.saved[-1]
    assert (state["step"], state["step_in_epoch"], state["history"]["epochs"]) == (3, 3, [])
    resumed = _Toy()
    resumed.restore(state)
    _assert_same(straight, resumed.train())


@pytest.mark.parametrize("stop", [2, 3, 6])
def test_checkpoints_without_the_generators_current_state_replay_its_draws(stop):
    straight = _Toy().train()
    state = _Toy(max_steps=stop).train().saved[-1]
    del state["loader"]["current"]
    resumed = _Toy()
    resumed.restore(state)
    _assert_same(straight, resumed.train())


def test_progress_bar_and_epoch_lines(capsys):
    run = _Toy(max_steps=4).train(show=True)
    out, err = capsys.readouterr()
    assert "toy epoch 1 |" in out and "toy epoch 2 |" not in out  # epoch 2 stopped mid-way: no record
    assert "toy epoch 1/3" in err and "toy epoch 2/3" in err
    assert len(run.history["epochs"]) == 1 and run.calls == {"begin_epoch": 2, "end_steps": 2}


def test_eval_shards_cover_every_sample_once_over_the_ranks():
    from deqdiff.training.loop import eval_shards

    shards = [list(eval_shards(5, 4, DistContext(rank, 3))) for rank in range(3)]
    # batches [0..3] and [4]: the second batch's one sample goes to rank 0, the others skip it
    assert [len(s) for s in shards] == [2, 1, 1]
    assert sorted(torch.cat([i for s in shards for i in s]).tolist()) == list(range(5))
    assert all(i.numel() for s in shards for i in s)


def test_evaluating_turns_autograd_and_training_mode_off_and_back_on():
    from deqdiff.training.loop import evaluating

    model = nn.Linear(2, 1)
    with evaluating(model):
        assert not model.training and not torch.is_grad_enabled()
    assert model.training and torch.is_grad_enabled()
    with pytest.raises(RuntimeError), evaluating(model):
        raise RuntimeError
    assert model.training and torch.is_grad_enabled()
    model.eval()
    with evaluating(model):
        pass
    assert not model.training
