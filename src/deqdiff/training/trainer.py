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
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data import ImageDataset, ShardedBatches, load_dataset
from .checkpoint import read_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import TrainConfig
from .correction import outputs_at_iterates
from .distributed import DistContext, local_device
from .jacobian import capture_equilibrium, hutchinson_frobenius
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
    batches = ShardedBatches(data.size(split), config.eval_batch_size, shuffle=False, rank=ctx.rank, world_size=ctx.world_size)
    meter = Meter()
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for _, idx in batches.epoch():
            if idx.numel() == 0:
                continue
            x = data.images(split, idx, dtype=dtype, device=device)
            y = data.labels(split, idx, device=device)
            with _autocast(config, device):
                logits = model(x)
            logits = _full_precision(logits)
            meter.add_batch(float(F.cross_entropy(logits, y, reduction="sum")), int((logits.argmax(1) == y).sum()), idx.numel())
            meter.add_solves(model, backward=False)
    model.train(was_training)
    return meter.reduce(ctx).summary()


class _Run:
    """The mutable state of one run (everything a checkpoint holds)."""

    def __init__(self, config: TrainConfig, data: ImageDataset, ctx: DistContext, device: str):
        self.config, self.data, self.ctx, self.device = config, data, ctx, device
        self.dtype = getattr(torch, config.dtype)
        torch.manual_seed(config.seed)
        np.random.seed(config.seed)
        random.seed(config.seed)
        self.model = build_model(config, data.image_shape, data.num_classes)
        ctx.broadcast_parameters(self.model)
        self.batches = ShardedBatches(
            data.size("train"), config.batch_size, rank=ctx.rank, world_size=ctx.world_size, seed=config.seed,
        )
        self.steps_per_epoch = len(self.batches)
        self.optimizer = make_optimizer(config, self.model)
        # fp16 needs loss scaling (Micikevicius et al. 2018); disabled, the scaler passes everything through
        self.scaler = torch.amp.GradScaler(torch.device(device).type, enabled=config.amp == "fp16")
        self.scheduler = make_scheduler(config, self.optimizer, config.epochs * self.steps_per_epoch)
        self.epoch = self.step = self.step_in_epoch = 0
        self.epoch_loader_state = self.batches.get_state()
        self.meter = Meter()
        self.history: dict = {"epochs": [], "steps": []}

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
            # the generator now (after this epoch's draw) and at the epoch's start (to replay it)
            "loader": {"epoch_start": self.epoch_loader_state, "current": self.batches.get_state()},
            "epoch": self.epoch, "step": self.step, "step_in_epoch": self.step_in_epoch,
            "meter": self.meter.state(),
            "history": self.history,
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
        self.meter = Meter.from_state(state["meter"])
        self.history = state["history"]

    def save(self) -> None:
        out = self.config.out
        if out is None or not self.ctx.is_main:
            return
        save_checkpoint(Path(out) / "checkpoint.pt", self.state())
        metrics = {"config": self.config.to_dict(), "parameters": count_parameters(self.model), **self.history}
        tmp = Path(out) / "metrics.json.tmp"
        tmp.write_text(json.dumps(metrics, indent=1))
        tmp.replace(Path(out) / "metrics.json")

    # -- one optimizer step ----------------------------------------------------------------------
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
            _add_backward(meter, model)
            meter.add_batch(float(loss_sum.detach()), int((logits.argmax(1) == y).sum()), idx.numel(), jac_sum)
        self.ctx.all_reduce_gradients(model)
        self.scaler.unscale_(self.optimizer)
        if cfg.grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return meter


def _add_backward(meter: Meter, model: nn.Module) -> None:
    info = getattr(getattr(model, "deq", None), "last_info", None)
    if info is None:
        return
    for d in info.derivatives:
        meter._add("bwd_iter", float(d.iterations.double().sum()))
        meter._add("bwd_n", float(d.iterations.numel()))
        meter._max("bwd_iter_max", float(d.iterations.max()))


def _postfix(s: dict) -> dict:
    out = {"loss": f"{s['loss']:.3f}", "acc": f"{s['acc']:.3f}"}
    if "fwd_iter_mean" in s:
        out.update(it=f"{s['fwd_iter_mean']:.1f}/{s['fwd_iter_max']}", res=f"{s['fwd_res_max']:.1e}")
    return out


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
    total = config.epochs * run.steps_per_epoch
    limit = min(total, config.max_steps) if config.max_steps is not None else total
    show = config.progress and ctx.is_main
    if show:
        from tqdm import tqdm
    while run.epoch < config.epochs and run.step < limit:
        if run.step_in_epoch == 0:
            run.epoch_loader_state = run.batches.get_state()
        else:  # resumed mid-epoch: replay this epoch's permutation
            run.batches.set_state(run.epoch_loader_state)
        plan = run.batches.epoch()
        t0, c0 = time.perf_counter(), time.process_time()  # wall and CPU time of the epoch's steps
        bar = tqdm(total=len(plan), initial=run.step_in_epoch, desc=f"epoch {run.epoch + 1}/{config.epochs}",
                   leave=True, dynamic_ncols=True) if show else None
        while run.step_in_epoch < len(plan) and run.step < limit:
            global_size, idx = plan[run.step_in_epoch]
            lr = run.optimizer.param_groups[0]["lr"]
            step_meter = run.train_step(global_size, idx).reduce(ctx)
            run.meter.merge(step_meter)
            run.step += 1
            run.step_in_epoch += 1
            s = step_meter.summary()
            run.history["steps"].append({"step": run.step, "epoch": run.epoch + 1, "lr": lr, **s})
            if bar is not None:
                bar.set_postfix(_postfix(s), refresh=False)
                bar.update(1)
            if config.checkpoint_every and run.step % config.checkpoint_every == 0:
                run.save()
        if bar is not None:
            bar.close()
        if run.step_in_epoch < len(plan):  # stopped by max_steps mid-epoch
            break
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        train_summary = run.meter.summary()
        test_summary = evaluate(run.model, data, config, ctx=ctx, device=device)
        record = {"epoch": run.epoch + 1, "step": run.step, "time_s": elapsed, "cpu_time_s": cpu,
                  "train": train_summary, "test": test_summary}
        run.history["epochs"].append(record)
        if show:
            tqdm.write(_epoch_line(record))
        run.epoch += 1
        run.step_in_epoch = 0
        run.meter = Meter()
        run.save()
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
