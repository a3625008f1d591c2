"""The resumable epoch loop every trainer shares (``deqdiff train``, ``deqdiff inverse``, ``deqdiff lm``).

One loop, written once: each epoch draws its permutation from the run's seeded data-order
generator (:class:`~deqdiff.data.loader.ShardedBatches`, sharded over the ranks of a
``torch.distributed`` group), takes one optimizer step per global batch with an optional progress
bar, checkpoints every ``checkpoint_every`` steps and at every epoch end, and records per-step
and per-epoch metrics. A checkpoint holds the generator as the epoch began and as it is now, the
epoch, the step, the step within the epoch and the epoch's running sums, so that a run resumed
at any step — mid-epoch, after an epoch's last step but before its evaluation, or at an epoch
boundary — continues bit for bit as if it had never stopped.

A trainer subclasses :class:`ResumableRun` (its model, optimizer and one training step) and
calls :func:`train_epochs`; the hooks below default to what most trainers need.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from ..data.loader import ShardedBatches
from .distributed import DistContext
from .metrics import Meter

__all__ = ["ResumableRun", "train_epochs", "add_backward_solves", "evaluating", "eval_shards"]


class ResumableRun:
    """Position, running sums and history of one resumable run; subclasses add the model.

    The subclass sets ``config`` (with ``epochs``, ``batch_size``, ``seed``, ``max_steps``,
    ``checkpoint_every`` and ``grad_clip``), ``ctx`` (a :class:`DistContext`), ``model``,
    ``optimizer`` and ``scheduler``, calls :meth:`start` with the number of training samples,
    and implements :meth:`train_step` and :meth:`end_epoch`. ``meter_class`` accumulates sums
    reducible over ranks (``merge``, ``reduce(ctx)``, ``state()``, ``from_state``,
    ``summary()``), saved under ``meter_key``."""

    meter_class: type = Meter
    meter_key = "meter"
    label = ""  # progress-bar prefix, e.g. "deq "
    leave_bar = True  # keep each epoch's finished progress bar on screen
    config: object
    ctx: DistContext
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler

    def start(self, n: int) -> None:
        """Shuffled batches over ``n`` samples (seeded by ``config.seed``, this rank's shard) and
        the position at the start of the run."""
        cfg = self.config
        self.batches = ShardedBatches(n, cfg.batch_size, rank=self.ctx.rank, world_size=self.ctx.world_size,
                                      seed=cfg.seed)
        self.steps_per_epoch = len(self.batches)
        self.epoch = self.step = self.step_in_epoch = 0
        self.epoch_loader_state = self.batches.get_state()
        self.meter = self.meter_class()
        self.epoch_time = 0.0  # seconds spent in this epoch's training steps so far
        self.history: dict = {"epochs": [], "steps": []}

    @property
    def limit(self) -> int:
        """Steps this run stops after: all epochs', or ``config.max_steps`` if fewer."""
        total = self.config.epochs * self.steps_per_epoch
        return total if self.config.max_steps is None else min(total, self.config.max_steps)

    @property
    def done(self) -> bool:
        return self.epoch >= self.config.epochs

    # -- checkpoints ---------------------------------------------------------------------------
    def position_state(self) -> dict:
        """The loop's part of a checkpoint: the data-order generator now (after this epoch's
        draw) and at the epoch's start (to replay it), the position, running sums and history."""
        return {"loader": {"epoch_start": self.epoch_loader_state, "current": self.batches.get_state()},
                "epoch": self.epoch, "step": self.step, "step_in_epoch": self.step_in_epoch,
                self.meter_key: self.meter.state(), "history": self.history}

    def restore_position(self, state: dict) -> None:
        """Continue from :meth:`position_state`'s keys of ``state``."""
        self.epoch_loader_state = state["loader"]["epoch_start"]
        self.epoch, self.step, self.step_in_epoch = int(state["epoch"]), int(state["step"]), int(state["step_in_epoch"])
        # At an epoch boundary the next epoch draws its permutation from the generator as it is
        # now, not from a freshly seeded one (that replayed epoch 1's order after every resume).
        if "current" in state["loader"]:
            self.batches.set_state(state["loader"]["current"])
        else:  # checkpoints without it: replay the draws up to now
            self.batches.set_state(self.epoch_loader_state)
            if self.step_in_epoch == 0 and self.epoch > 0:
                self.batches.epoch()
        self.meter = self.meter_class.from_state(state[self.meter_key])
        self.history = state["history"]

    def optimizer_step(self, scaler: torch.amp.GradScaler | None = None) -> None:
        """End of a training step once this rank's gradients are in: sum them over the ranks,
        clip their norm to ``config.grad_clip`` (if set), step the optimizer (through the loss
        ``scaler`` if given: unscaled before clipping, steps skipped on inf/NaN) and the schedule."""
        self.ctx.all_reduce_gradients(self.model)
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        if self.config.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        if scaler is not None:
            scaler.step(self.optimizer)
            scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()

    # -- hooks ---------------------------------------------------------------------------------
    def train_step(self, global_size: int, idx: Tensor):
        """One optimizer step on this rank's samples ``idx`` of a global batch of ``global_size``;
        returns this rank's ``meter_class`` of the step (the loop reduces it over ranks)."""
        raise NotImplementedError

    def end_epoch(self) -> dict:
        """What the epoch's record adds to epoch, step, time and train metrics (e.g. ``{"test": ...}``)."""
        raise NotImplementedError

    def summarize(self, meter) -> dict:
        """The metrics recorded of a step's or an epoch's running sums."""
        return meter.summary()

    def step_record(self, lr: float, seconds: float, summary: dict) -> dict:
        """The history entry of the step just taken (``seconds``: its time)."""
        return {"step": self.step, "epoch": self.epoch + 1, "lr": lr, **summary}

    def epoch_times(self, wall: float, cpu: float) -> dict:
        """The epoch record's times: by default ``time_s``, the seconds of its steps (across
        resumes, if the checkpoint keeps ``epoch_time``); ``wall`` and ``cpu``: this process's
        wall and CPU time since the epoch's permutation was drawn."""
        return {"time_s": self.epoch_time}

    def begin_epoch(self) -> None:
        """Called once the epoch's permutation is drawn, before its first step."""

    def end_steps(self) -> None:
        """Called after the epoch's steps (or a ``max_steps`` stop), before its evaluation."""

    def postfix(self, summary: dict) -> dict:
        """The progress bar's postfix of a step."""
        return {}

    def epoch_line(self, record: dict) -> str:
        """The line printed under the progress bar at an epoch's end."""
        return f"{self.label}epoch {record['epoch']} | {record['time_s']:.1f}s"


def train_epochs(run: ResumableRun, save: Callable[[], None], *, show: bool = False) -> None:
    """Train ``run`` from its position until its epochs are done or it has taken
    ``run.limit`` steps; ``save()`` writes the checkpoint every ``config.checkpoint_every``
    steps and after every epoch's evaluation. ``show``: a tqdm progress bar per epoch."""
    config, ctx = run.config, run.ctx
    if show:
        from tqdm import tqdm
    while run.epoch < config.epochs and run.step < run.limit:
        if run.step_in_epoch == 0:
            run.epoch_loader_state = run.batches.get_state()
        else:  # resumed mid-epoch: replay this epoch's permutation
            run.batches.set_state(run.epoch_loader_state)
        plan = run.batches.epoch()
        run.begin_epoch()
        t0, c0 = time.perf_counter(), time.process_time()
        bar = tqdm(total=len(plan), initial=run.step_in_epoch, desc=f"{run.label}epoch {run.epoch + 1}/{config.epochs}",
                   leave=run.leave_bar, dynamic_ncols=True) if show else None
        while run.step_in_epoch < len(plan) and run.step < run.limit:
            global_size, idx = plan[run.step_in_epoch]
            lr = run.optimizer.param_groups[0]["lr"]
            t_step = time.perf_counter()
            step_meter = run.train_step(global_size, idx).reduce(ctx)
            seconds = time.perf_counter() - t_step
            run.epoch_time += seconds
            run.meter.merge(step_meter)
            run.step += 1
            run.step_in_epoch += 1
            s = run.summarize(step_meter)
            run.history["steps"].append(run.step_record(lr, seconds, s))
            if bar is not None:
                bar.set_postfix(run.postfix(s), refresh=False)
                bar.update(1)
            if config.checkpoint_every and run.step % config.checkpoint_every == 0:
                save()
        if bar is not None:
            bar.close()
        run.end_steps()
        if run.step_in_epoch < len(plan):  # stopped by max_steps mid-epoch
            break
        times = run.epoch_times(time.perf_counter() - t0, time.process_time() - c0)
        train_summary = run.summarize(run.meter)
        record = {"epoch": run.epoch + 1, "step": run.step, **times, "train": train_summary, **run.end_epoch()}
        run.history["epochs"].append(record)
        if show:
            tqdm.write(run.epoch_line(record))
        run.epoch += 1
        run.step_in_epoch = 0
        run.meter = run.meter_class()
        run.epoch_time = 0.0
        save()


def add_backward_solves(meter: Meter, model: nn.Module) -> None:
    """Record the derivative solves of ``model.deq.last_info`` (after the backward) in ``meter``."""
    info = getattr(getattr(model, "deq", None), "last_info", None)
    for d in (info.derivatives if info is not None else []):
        meter._add("bwd_iter", float(d.iterations.double().sum()))
        meter._add("bwd_n", float(d.iterations.numel()))
        meter._max("bwd_iter_max", float(d.iterations.max()))


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode without autograd inside; its training mode is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def eval_shards(n: int, batch_size: int, ctx: DistContext) -> Iterator[Tensor]:
    """This rank's indices of each evaluation batch of ``n`` samples in order (batches of
    ``batch_size`` split over the ranks of ``ctx``; a rank's empty shard is skipped)."""
    for _, idx in ShardedBatches(n, batch_size, shuffle=False, rank=ctx.rank, world_size=ctx.world_size).epoch():
        if idx.numel():
            yield idx
