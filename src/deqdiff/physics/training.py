"""A small training loop with exact checkpoint/resume.

``Trainer(model, loss_fn, sample_fn, phases)`` runs the phases in order (e.g. Adam with a
learning-rate schedule, then L-BFGS); one *step* = one fresh batch from
``sample_fn(generator, step)`` and one optimizer step on ``loss_fn(model, batch, generator)``
(a :class:`~deqdiff.physics.losses.LossTerms`). Randomness flows from one seeded CPU
``torch.Generator`` (device independent), and the checkpoint holds everything the next step
depends on — model, optimizer, scheduler, generator and global RNG states, step, phase, history —
so a resumed run takes bit-identical steps (``tests/physics/test_training.py``). Checkpoints
go through :mod:`deqdiff.training.checkpoint` (atomic writes, ``weights_only`` loading) with
the format tag ``PINN_FORMAT``.

Stable API: ``Phase(name, steps, make_optimizer, make_scheduler=None)``, ``Trainer`` with
``step()``, ``run(n_steps=None, progress=False, checkpoint=None, checkpoint_every=0)``,
``save(path, extra=None)``, ``load(path) -> state``, ``history`` (list of per-step dicts), ``done``.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..engine.validation import all_finite
from ..training.checkpoint import PINN_FORMAT, read_checkpoint, rng_state, save_checkpoint, set_rng_state
from .losses import LossTerms

__all__ = ["Phase", "Trainer"]


@dataclass
class Phase:
    """``steps`` optimizer steps with ``make_optimizer(params)`` and optionally
    ``make_scheduler(optimizer)`` (stepped once per step)."""

    name: str
    steps: int
    make_optimizer: Callable[[list], torch.optim.Optimizer]
    make_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError(f"phase {self.name!r}: steps must be ≥ 0, got {self.steps}")


def _grads_finite(model: nn.Module) -> bool:
    return all_finite(*(p.grad for p in model.parameters() if p.grad is not None))


class Trainer:
    def __init__(self, model: nn.Module, loss_fn: Callable[..., LossTerms], sample_fn: Callable[..., Any],
                 phases: list[Phase], *, seed: int = 0, grad_clip: float | None = None):
        if not phases:
            raise ValueError("at least one training phase is needed")
        self.model, self.loss_fn, self.sample_fn, self.phases = model, loss_fn, sample_fn, phases
        self.grad_clip = grad_clip
        self.generator = torch.Generator().manual_seed(seed)
        self.step_count = 0
        self.history: list[dict] = []
        self.phase_index = -1
        self.optimizer = self.scheduler = None
        self._enter_phase()

    # --- phases ---------------------------------------------------------------------------
    @property
    def total_steps(self) -> int:
        return sum(p.steps for p in self.phases)

    @property
    def done(self) -> bool:
        return self.step_count >= self.total_steps

    def _phase_for(self, step: int) -> int:
        acc = 0
        for i, p in enumerate(self.phases):
            acc += p.steps
            if step < acc:
                return i
        return len(self.phases) - 1

    def _enter_phase(self) -> None:
        i = self._phase_for(self.step_count)
        if i == self.phase_index:
            return
        self.phase_index = i
        phase = self.phases[i]
        self.optimizer = phase.make_optimizer([p for p in self.model.parameters() if p.requires_grad])
        self.scheduler = phase.make_scheduler(self.optimizer) if phase.make_scheduler else None

    # --- one step --------------------------------------------------------------------------
    def step(self) -> dict:
        self._enter_phase()
        t0, c0 = time.perf_counter(), time.process_time()
        batch = self.sample_fn(self.generator, self.step_count)
        first: list[LossTerms] = []
        skipped: list[bool] = []

        def closure():
            self.optimizer.zero_grad(set_to_none=True)
            out = self.loss_fn(self.model, batch, self.generator)
            out.total.backward()
            if not torch.isfinite(out.total):
                raise FloatingPointError(f"loss became {float(out.total)} at step {self.step_count}: "
                                         "lower the learning rate or check the data")
            if not _grads_finite(self.model):
                # a derivative solve that failed (reported by its own ConvergenceWarning, e.g.
                # where I − ∂f/∂z is nearly singular) would write NaN into every weight: skip
                # this update, as mixed-precision loss scaling does with an overflowed gradient
                self.optimizer.zero_grad(set_to_none=True)
                skipped.append(True)
                warnings.warn(f"step {self.step_count}: non-finite gradient; the optimizer step is skipped",
                              RuntimeWarning, stacklevel=2)
            if self.grad_clip is not None:
                nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            if not first:
                first.append(out)
            return out.total

        if isinstance(self.optimizer, torch.optim.LBFGS):
            self.optimizer.step(closure)
        else:
            closure()
            if not skipped:
                self.optimizer.step()
        lr = self.optimizer.param_groups[0]["lr"]
        if self.scheduler is not None:
            self.scheduler.step()
        rec = dict(first[0].terms, step=self.step_count, phase=self.phases[self.phase_index].name, lr=lr,
                   time=time.perf_counter() - t0, cpu_time=time.process_time() - c0, skipped=bool(skipped))
        self.history.append(rec)
        self.step_count += 1
        return rec

    def run(self, n_steps: int | None = None, *, progress: bool = False, checkpoint: str | os.PathLike | None = None,
            checkpoint_every: int = 0, checkpoint_extra: dict | None = None, desc: str = "train") -> list[dict]:
        """Run ``n_steps`` (default: to the end of the last phase), saving a checkpoint (with
        ``checkpoint_extra``) every ``checkpoint_every`` steps and at the end when ``checkpoint``
        is given."""
        end = self.total_steps if n_steps is None else min(self.total_steps, self.step_count + n_steps)
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=self.total_steps, initial=self.step_count, desc=desc, dynamic_ncols=True)
        try:
            while self.step_count < end:
                rec = self.step()
                if bar is not None:
                    post = {"loss": f"{rec['total']:.2e}", "phase": rec["phase"]}
                    if "iters_mean" in rec:
                        post["iters"] = f"{rec['iters_mean']:.1f}/{rec['iters_max']:.0f}"
                    bar.set_postfix(post, refresh=False)
                    bar.update(1)
                if checkpoint is not None and checkpoint_every and self.step_count % checkpoint_every == 0:
                    self.save(checkpoint, checkpoint_extra)
        finally:
            if bar is not None:
                bar.close()
        if checkpoint is not None:
            self.save(checkpoint, checkpoint_extra)
        return self.history

    # --- checkpoints -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "step": self.step_count,
            "phase_index": self.phase_index,  # the phase of the last step taken
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "generator": self.generator.get_state(),
            "rng": rng_state(),
            "history": list(self.history),
        }

    def load_state_dict(self, state: dict) -> None:
        step, phase = int(state["step"]), int(state["phase_index"])
        # The checkpoint holds the optimizer of the phase its last step ran in; at a phase's end
        # (e.g. the last Adam step) the next step() switches phases exactly as an uninterrupted
        # run does, so restore that phase, not the one of the next step.
        expected = self._phase_for(step - 1) if step > 0 else 0
        if step > self.total_steps or phase != expected:
            raise ValueError(f"the checkpoint (step {step}, phase {phase}) does not fit these phases "
                             f"({[(p.name, p.steps) for p in self.phases]}): different settings?")
        self.model.load_state_dict(state["model"])
        self.step_count = step
        self.phase_index = phase
        p = self.phases[phase]
        self.optimizer = p.make_optimizer([q for q in self.model.parameters() if q.requires_grad])
        self.scheduler = p.make_scheduler(self.optimizer) if p.make_scheduler else None
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        if "rng" in state:
            set_rng_state(state["rng"])
        else:  # written before the shared checkpoint module: torch (and CUDA) only
            torch.set_rng_state(state["torch_rng"])
            if state.get("cuda_rng") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.history = list(state["history"])

    def save(self, path: str | os.PathLike, extra: dict | None = None) -> None:
        """Write the checkpoint atomically; ``extra`` (e.g. the run's config) is stored with it."""
        save_checkpoint(path, {**(extra or {}), **self.state_dict()}, format=PINN_FORMAT)

    def load(self, path: str | os.PathLike) -> dict:
        """Continue from the checkpoint at ``path``; returns the whole checkpoint dict."""
        state = read_checkpoint(path, format=PINN_FORMAT, unversioned=True)
        self.load_state_dict(state)
        return state
