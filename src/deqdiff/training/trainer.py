"""``train(config)``: classification training of DEQs and their explicit counterparts.

One optimizer step per global batch: every rank computes the gradient of
(sum of its shard's cross-entropies [+ jac_reg · Σ ‖J_f‖_F²/N]) / (global batch size), the
gradients are summed over ranks, then Adam/SGD and the cosine schedule step (per step,
T_max = all steps of the run). Metrics per step and per epoch (train and held-out test loss,
accuracy, forward-solve iterations mean/max, final relative residual, backward-solve
iterations) go to ``metrics.json``; ``checkpoint.pt`` resumes bit-exactly.
"""

from __future__ import annotations

import json
import random
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data import ImageDataset, load_dataset
from .checkpoint import read_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import TrainConfig
from .correction import outputs_at_iterates
from .distributed import DistContext, local_device
from .jacobian import capture_equilibrium, hutchinson_frobenius
from .loop import ResumableRun, add_backward_solves, eval_shards, evaluating, train_epochs
from .metrics import Meter
from .models import build_model, count_parameters

__all__ = ["train", "evaluate", "TrainResult", "make_optimizer", "make_scheduler", "RESUMABLE_CHANGES"]

#: settings a resumed run may change without breaking bit-exact continuation
RESUMABLE_CHANGES = frozenset({"max_steps", "progress", "out", "device", "checkpoint_every", "data_dir"})


@dataclass
class TrainResult:
    model: nn.Module
    config: TrainConfig
    history: dict = field(default_factory=dict)  # {"epochs": [...], "steps": [...]}
    steps: int = 0
    out: Path | None = None

    @property
    def final(self) -> dict:
        """The last completed epoch's record (train and test metrics), or {} if none finished."""
        return self.history["epochs"][-1] if self.history.get("epochs") else {}


def make_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def make_scheduler(config: TrainConfig, optimizer, total_steps: int):
    if config.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def _full_precision(logits: torch.Tensor) -> torch.Tensor:
    """The loss in at least float32 (autocast may hand back bfloat16 logits)."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def _autocast(config: TrainConfig, device: str):
    if config.amp in ("bf16", "fp16"):  # inside a DEQ only the cell runs in low precision
        dtype = torch.bfloat16 if config.amp == "bf16" else torch.float16
        return torch.autocast(device_type=torch.device(device).type, dtype=dtype)
    return nullcontext()


def evaluate(model: nn.Module, data: ImageDataset, config: TrainConfig, *, split: str = "test",
             ctx: DistContext | None = None, device: str | None = None) -> dict:
    """Loss, accuracy and forward-solve statistics of ``model`` on ``split`` (sharded over ranks)."""
    ctx = ctx or DistContext.current()
    device = device or config.device
    dtype = getattr(torch, config.dtype)
    meter = Meter()
    with evaluating(model):
        for idx in eval_shards(data.size(split), config.eval_batch_size, ctx):
            x = data.images(split, idx, dtype=dtype, device=device)
            y = data.labels(split, idx, device=device)
            with _autocast(config, device):
                logits = model(x)
            logits = _full_precision(logits)
            meter.add_batch(float(F.cross_entropy(logits, y, reduction="sum")), int((logits.argmax(1) == y).sum()), idx.numel())
            meter.add_solves(model, backward=False)
    return meter.reduce(ctx).summary()


class _Run(ResumableRun):
    """The mutable state of one run (everything a checkpoint holds)."""

    def __init__(self, config: TrainConfig, data: ImageDataset, ctx: DistContext, device: str):
        self.config, self.data, self.ctx, self.device = config, data, ctx, device
        self.dtype = getattr(torch, config.dtype)
        torch.manual_seed(config.seed)
        np.random.seed(config.seed)
        random.seed(config.seed)
        self.model = build_model(config, data.image_shape, data.num_classes)
        ctx.broadcast_parameters(self.model)
        self.start(data.size("train"))
        self.optimizer = make_optimizer(config, self.model)
        # fp16 needs loss scaling (Micikevicius et al. 2018); disabled, the scaler passes everything through
        self.scaler = torch.amp.GradScaler(torch.device(device).type, enabled=config.amp == "fp16")
        self.scheduler = make_scheduler(config, self.optimizer, config.epochs * self.steps_per_epoch)

    # -- checkpoints ---------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "config": self.config.to_dict(),
            "data_info": {"name": self.data.name, "image_shape": list(self.data.image_shape), "num_classes": self.data.num_classes},
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            **self.position_state(),
        }

    def restore(self, state: dict) -> None:
        saved = TrainConfig.from_dict(dict(state["config"]))
        changed = sorted(k for k, v in saved.to_dict().items() if getattr(self.config, k) != v and k not in RESUMABLE_CHANGES)
        if changed:
            raise ValueError(
                f"cannot resume: settings {changed} differ from the checkpoint's "
                f"({ {k: getattr(saved, k) for k in changed} }); only {sorted(RESUMABLE_CHANGES)} may change"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.restore_position(state)

    def save(self) -> None:
        out = self.config.out
        if out is None or not self.ctx.is_main:
            return
        save_checkpoint(Path(out) / "checkpoint.pt", self.state())
        metrics = {"config": self.config.to_dict(), "parameters": count_parameters(self.model), **self.history}
        tmp = Path(out) / "metrics.json.tmp"
        tmp.write_text(json.dumps(metrics, indent=1))
        tmp.replace(Path(out) / "metrics.json")

    # -- the loop's hooks (deqdiff.training.loop) ------------------------------------------------
    def train_step(self, global_size: int, idx: torch.Tensor) -> Meter:
        cfg, model = self.config, self.model
        meter = Meter()
        self.optimizer.zero_grad(set_to_none=True)
        if idx.numel():
            x = self.data.images("train", idx, dtype=self.dtype, device=self.device)
            y = self.data.labels("train", idx, device=self.device)
            capture = capture_equilibrium(model) if cfg.jac_reg > 0 else nullcontext({})
            with capture as box, _autocast(cfg, self.device):
                logits = model(x, store_trajectory=True) if cfg.correction else model(x)
            meter.add_solves(model, backward=False)
            logits = _full_precision(logits)
            loss_sum = F.cross_entropy(logits, y, reduction="sum")
            objective = loss_sum / global_size
            if cfg.correction:  # fixed-point correction: losses on the solver's iterates too
                with _autocast(cfg, self.device):
                    extra = outputs_at_iterates(model, x, cfg.correction)
                for w, out in zip(cfg.correction_weights, extra):
                    objective = objective + w * F.cross_entropy(_full_precision(out), y, reduction="sum") / global_size
            jac_sum = 0.0
            if cfg.jac_reg > 0:
                z = box["z"]
                per_sample = hutchinson_frobenius(model.deq.cell, z, box["x"], samples=cfg.jac_reg_samples)
                penalty = (per_sample / z[0].numel()).sum()
                objective = objective + cfg.jac_reg * penalty / global_size
                jac_sum = float(penalty.detach())
            self.scaler.scale(objective).backward()
            add_backward_solves(meter, model)
            meter.add_batch(float(loss_sum.detach()), int((logits.argmax(1) == y).sum()), idx.numel(), jac_sum)
        self.optimizer_step(self.scaler)
        return meter

    def epoch_times(self, wall: float, cpu: float) -> dict:
        return {"time_s": wall, "cpu_time_s": cpu}  # wall and CPU time of the epoch's steps

    def end_epoch(self) -> dict:
        return {"test": evaluate(self.model, self.data, self.config, ctx=self.ctx, device=self.device)}

    def postfix(self, s: dict) -> dict:
        out = {"loss": f"{s['loss']:.3f}", "acc": f"{s['acc']:.3f}"}
        if "fwd_iter_mean" in s:
            out.update(it=f"{s['fwd_iter_mean']:.1f}/{s['fwd_iter_max']}", res=f"{s['fwd_res_max']:.1e}")
        return out

    def epoch_line(self, record: dict) -> str:
        return _epoch_line(record)


def train(config: TrainConfig, data: ImageDataset | None = None, *, resume: bool | str | Path = False) -> TrainResult:
    """Train ``config.model`` on ``config.data`` (or the given ``data``); returns the model and history.

    ``resume=True`` continues from ``config.out/checkpoint.pt`` if it exists; a path resumes from that
    checkpoint. Under ``torch.distributed`` (e.g. ``torchrun``) each rank trains on its shard of
    every global batch; rank 0 writes the files."""
    ctx = DistContext.current()
    device = local_device(config.device, ctx)
    if data is None:
        data = load_dataset(config.data, config.data_dir, seed=config.seed, test_fraction=config.test_fraction)
    if config.train_limit or config.test_limit:
        data = data.limit(config.train_limit, config.test_limit)
    run = _Run(config, data, ctx, device)
    if resume:
        path = Path(config.out or ".") / "checkpoint.pt" if resume is True else Path(resume)
        if resume is not True or path.is_file():
            run.restore(read_checkpoint(path))
    train_epochs(run, run.save, show=config.progress and ctx.is_main)
    run.save()
    ctx.barrier()
    return TrainResult(run.model, config, run.history, run.step, Path(config.out) if config.out else None)


def _epoch_line(r: dict) -> str:
    tr, te = r["train"], r["test"]
    line = (f"epoch {r['epoch']}: train loss {tr['loss']:.4f} acc {tr['acc']:.4f} | test loss {te['loss']:.4f} "
            f"acc {te['acc']:.4f}")
    if "fwd_iter_mean" in te:
        line += f" | test solve iters {te['fwd_iter_mean']:.1f} (max {te['fwd_iter_max']}), res max {te['fwd_res_max']:.1e}"
    return line + f" | {r['time_s']:.1f}s"
