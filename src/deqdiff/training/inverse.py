"""Training of the inverse-problem DEQ and its deep-unrolling baseline (``deqdiff inverse``).

``train_inverse(config)`` trains each model of ``config.models`` in turn ("deq":
:class:`deqdiff.models.inverse.InverseDEQ`; "unrolled": :class:`~deqdiff.models.inverse.InverseUnrolled`
with ``config.k`` weight-tied steps) to minimize the mean squared error between reconstruction
and clean image, with Adam and cosine annealing per step, one optimizer step per global batch.
Every rank of a ``torch.distributed`` group computes the gradient of (sum of its shard's
per-image MSEs)/(global batch size); the all-reduce sum gives the global mean, so two
processes train exactly as one. After every epoch the held-out split is evaluated (MSE, PSNR,
forward-solve iterations and residuals); ``OUT/checkpoint.pt`` holds every model's state,
optimizer, schedule, data order and position and resumes bit-exactly.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import nn

from ..data.inverse import IMAGE_SETS, InverseData, load_inverse_data
from ..models.inverse import FORMS, GaussianBlur, Identity, InverseDEQ, InverseUnrolled, LinearOperator, psnr
from .checkpoint import read_checkpoint, rng_state, save_checkpoint, set_rng_state
from .distributed import DistContext, local_device
from .loop import ResumableRun, add_backward_solves, eval_shards, evaluating, train_epochs
from .metrics import Meter

__all__ = ["InverseConfig", "InverseResult", "train_inverse", "evaluate_inverse", "build_operator",
           "build_inverse_model", "load_task_data", "INVERSE_FORMAT", "TASKS", "MODELS", "RESUMABLE"]

INVERSE_FORMAT = "deqdiff-inverse-checkpoint/1"
TASKS = ("deblur", "denoise")
MODELS = ("deq", "unrolled")
#: settings a resumed run may change without changing its result
RESUMABLE = frozenset({"max_steps", "device", "checkpoint_every", "data_dir"})
#: default measurement noise (standard deviation, image units in [0, 1]) per task
DEFAULT_NOISE = {"deblur": 0.01, "denoise": 0.2}


@dataclass
class InverseConfig:
    """Settings of :func:`train_inverse` (saved in checkpoints and results).

    Defaults: scikit-learn digits upsampled (bilinear) from 8×8 to 16×16; deblurring with a 5×5
    Gaussian kernel of σ = 1 pixel and noise σ = 0.01, denoising with noise σ = 0.2; the
    proximal-gradient cell with η = 0.5, Tikhonov weight μ = 0.1 and a 32-channel residual denoiser; the DEQ solved by
    Anderson to relative residual 1e-4 (≤ 50 iterations), the unrolled baseline with K = 10."""

    task: str = "deblur"
    data: str = "digits"
    data_dir: str | None = None
    size: int | None = 16  # images resized to size × size; None keeps the stored size
    train_limit: int | None = None
    test_limit: int | None = None
    noise: float | None = None  # None: DEFAULT_NOISE[task]
    blur_sigma: float = 1.0
    blur_size: int = 5
    form: str = "prox"
    step_size: float = 0.5
    tikhonov: float = 0.1
    hidden: int = 32
    init_std: float = 1e-3
    k: int = 10
    models: tuple[str, ...] = MODELS
    epochs: int = 5
    batch_size: int = 32
    eval_batch_size: int = 256
    lr: float = 1e-3
    grad_clip: float | None = None
    solver: str = "anderson"
    tol: float = 1e-4
    max_iter: int = 50
    backward_solver: str = "gmres"
    backward_tol: float | None = None
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"
    checkpoint_every: int = 0  # also checkpoint every this many steps (0: at epoch ends only)
    max_steps: int | None = None  # stop each model after this many optimizer steps

    def __post_init__(self):
        self.models = tuple(self.models)
        if self.noise is None:
            self.noise = DEFAULT_NOISE.get(self.task, 0.0)
        for name, allowed in (("task", TASKS), ("data", tuple(IMAGE_SETS)), ("form", FORMS),
                              ("dtype", ("float32", "float64"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        if not self.models or any(m not in MODELS for m in self.models) or len(set(self.models)) != len(self.models):
            raise ValueError(f"models must be distinct names from {', '.join(MODELS)}; got {list(self.models)}")
        for name in ("size", "train_limit", "test_limit", "blur_size", "hidden", "k", "epochs", "batch_size",
                     "eval_batch_size", "max_iter"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1):
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if self.size is not None and self.size < 2:
            raise ValueError(f"size must be an integer >= 2, got {self.size!r}")
        if self.blur_size % 2 != 1:
            raise ValueError(f"blur_size must be odd, got {self.blur_size}")
        for name in ("checkpoint_every", "max_steps", "seed"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0):
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
        for name, strict in (("noise", False), ("blur_sigma", True), ("step_size", True), ("tikhonov", False), ("init_std", False),
                             ("lr", True), ("grad_clip", True), ("tol", True), ("backward_tol", True)):
            v = getattr(self, name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0 or (strict and v == 0):
                raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} 0, got {v!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["models"] = list(self.models)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "InverseConfig":
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown inverse-problem settings {unknown}")
        return cls(**d)


def build_operator(config: InverseConfig) -> LinearOperator:
    """``GaussianBlur(blur_sigma, blur_size)`` for deblurring, ``Identity()`` for denoising."""
    if config.task == "deblur":
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)  # the same kernel in every process, whatever its default
        try:
            return GaussianBlur(config.blur_sigma, config.blur_size)
        finally:
            torch.set_default_dtype(previous)
    return Identity()


def build_inverse_model(config: InverseConfig, kind: str, channels: int = 1) -> nn.Module:
    """The ``kind`` ("deq" or "unrolled") model of ``config``, initialized from ``config.seed``
    (in float32, then cast to ``config.dtype`` on ``config.device``; the global RNG is restored)."""
    if kind not in MODELS:
        raise ValueError(f"unknown model {kind!r}; choose from {', '.join(MODELS)}")
    common = dict(channels=channels, hidden=config.hidden, step_size=config.step_size, form=config.form,
                  tikhonov=config.tikhonov, init_std=config.init_std)
    previous = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        torch.set_default_dtype(torch.float32)
        try:
            op = build_operator(config)
            if kind == "deq":
                # training records every solve's residual instead of warning
                opts = {"on_fail": "ignore", "backward_solver": config.backward_solver}
                if config.backward_tol is not None:
                    opts["backward_tol"] = config.backward_tol
                model = InverseDEQ(op, solver=config.solver, tol=config.tol, max_iter=config.max_iter, **common, **opts)
            else:
                model = InverseUnrolled(op, k=config.k, **common)
        finally:
            torch.set_default_dtype(previous)
    return model.to(device=config.device, dtype=getattr(torch, config.dtype))


def load_task_data(config: InverseConfig) -> InverseData:
    """The run's images and measurements (:func:`deqdiff.data.inverse.load_inverse_data`)."""
    return load_inverse_data(build_operator(config), config.noise, config.data, config.data_dir, size=config.size,
                             seed=config.seed, train_limit=config.train_limit, test_limit=config.test_limit)


@dataclass
class InverseResult:
    config: InverseConfig
    models: dict[str, nn.Module]
    history: dict[str, dict]  # per model: {"epochs": [...], "steps": [...]}
    steps: dict[str, int]
    finished: bool  # every model trained for all its epochs

    def final(self, kind: str) -> dict:
        h = self.history[kind]["epochs"]
        return h[-1] if h else {}


def _per_image_mse(out, x):
    return (out - x).flatten(1).pow(2).mean(1)


def evaluate_inverse(model: nn.Module, data: InverseData, config: InverseConfig, *, split: str = "test",
                     ctx: DistContext | None = None, device: str | None = None, **overrides) -> dict:
    """Mean per-image MSE and PSNR (dB, peak 1) of ``model`` on ``split`` and, for the DEQ, the
    forward solves' iterations, relative residuals and converged fraction (sharded over ranks);
    ``overrides`` go to ``model(y, **overrides)``."""
    ctx = ctx or DistContext.current()
    device = device or config.device
    dtype = getattr(torch, config.dtype)
    meter, psnr_sum = Meter(), torch.zeros(1, dtype=torch.float64)
    with evaluating(model):
        for idx in eval_shards(data.size(split), config.eval_batch_size, ctx):
            y, x = data.batch(split, idx, dtype=dtype, device=device)
            out = model(y, **overrides)
            meter.add_batch(float(_per_image_mse(out, x).sum()), 0, idx.numel())
            meter.add_solves(model, backward=False)
            psnr_sum += float(psnr(out, x).double().sum())
    meter = meter.reduce(ctx)
    s = _summary(meter)
    s["psnr"] = float(ctx.sum(psnr_sum)[0]) / max(s["samples"], 1)
    return s


class _ModelRun(ResumableRun):
    """One model's training state (everything its part of the checkpoint holds)."""

    leave_bar = False

    def __init__(self, kind: str, config: InverseConfig, data: InverseData, ctx: DistContext, device: str):
        self.kind, self.config, self.data, self.ctx, self.device = kind, config, data, ctx, device
        self.label = f"{kind} "
        cfg = config
        self.model = build_inverse_model(
            InverseConfig.from_dict({**cfg.to_dict(), "device": device}), kind, data.image_shape[0])
        ctx.broadcast_parameters(self.model)
        self.start(data.size("train"))
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=max(cfg.epochs * self.steps_per_epoch, 1))

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), **self.position_state(), "epoch_time": self.epoch_time}

    def restore(self, s: dict) -> None:
        self.model.load_state_dict(s["model"])
        self.optimizer.load_state_dict(s["optimizer"])
        self.scheduler.load_state_dict(s["scheduler"])
        self.restore_position(s)
        self.epoch_time = float(s["epoch_time"])

    # -- the loop's hooks (deqdiff.training.loop) ------------------------------------------------
    def train_step(self, global_size: int, idx: torch.Tensor) -> Meter:
        model, meter = self.model, Meter()
        self.optimizer.zero_grad(set_to_none=True)
        if idx.numel():
            y, x = self.data.batch("train", idx, dtype=getattr(torch, self.config.dtype), device=self.device)
            out = model(y)
            loss_sum = _per_image_mse(out, x).sum()
            meter.add_solves(model, backward=False)
            (loss_sum / global_size).backward()
            add_backward_solves(meter, model)
            meter.add_batch(float(loss_sum.detach()), 0, idx.numel())
        self.optimizer_step()
        return meter

    def summarize(self, meter: Meter) -> dict:
        return _summary(meter)

    def epoch_times(self, wall: float, cpu: float) -> dict:
        return {"time_s": self.epoch_time, "cpu_time_s": cpu}  # cpu: this process's CPU time of the epoch's steps

    def end_epoch(self) -> dict:
        return {"test": evaluate_inverse(self.model, self.data, self.config, ctx=self.ctx, device=self.device)}

    def postfix(self, s: dict) -> dict:
        post = {"mse": f"{s['mse']:.2e}"}
        if "fwd_iter_mean" in s:
            post.update(it=f"{s['fwd_iter_mean']:.1f}/{s['fwd_iter_max']}", res=f"{s['fwd_res_max']:.0e}")
        return post

    def epoch_line(self, record: dict) -> str:
        test = record["test"]
        line = (f"{self.kind} epoch {record['epoch']}: train mse {record['train']['mse']:.3e} | test psnr "
                f"{test['psnr']:.2f} dB")
        if "fwd_iter_mean" in test:
            line += f" | solve iters {test['fwd_iter_mean']:.1f} (max {test['fwd_iter_max']}), res max {test['fwd_res_max']:.1e}"
        return line + f" | {record['time_s']:.1f}s"


def _summary(meter: Meter) -> dict:
    """A meter's summary in the inverse problem's terms (``mse`` for the loss, no accuracy)."""
    s = meter.summary()
    s.pop("acc")
    s["mse"] = s.pop("loss")
    return s


class _Checkpointer:
    def __init__(self, config: InverseConfig, runs: dict[str, _ModelRun], out: Path | None, ctx: DistContext):
        self.config, self.runs, self.out, self.ctx = config, runs, out, ctx

    def save(self) -> None:
        if self.out is None or not self.ctx.is_main:
            return
        state = {"config": self.config.to_dict(), "rng": rng_state(),
                 "runs": {k: r.state() for k, r in self.runs.items()}}
        save_checkpoint(self.out / "checkpoint.pt", state, format=INVERSE_FORMAT)


def read_inverse_checkpoint(path: str | Path) -> dict:
    """The checkpoint of an inverse-problem run (``OUT/checkpoint.pt`` or its folder);
    ``FileNotFoundError`` / ``ValueError`` as :func:`deqdiff.training.read_checkpoint`."""
    return read_checkpoint(path, format=INVERSE_FORMAT)


def changed_settings(config: InverseConfig, saved: dict) -> list[str]:
    """Settings of ``config`` that differ from a checkpoint's and would change the result."""
    mine = config.to_dict()
    return sorted(k for k, v in saved.items() if k not in RESUMABLE and mine.get(k) != v)


def train_inverse(config: InverseConfig, data: InverseData | None = None, *, out: str | Path | None = None,
                  resume: bool = False, progress: bool = False) -> InverseResult:
    """Train the models of ``config`` (module docstring); with ``out`` the checkpoint goes to
    ``out/checkpoint.pt`` (every epoch, every ``checkpoint_every`` steps, at the end) and
    ``resume=True`` continues from it (``ValueError`` if its settings differ in anything but
    :data:`RESUMABLE`). Under ``torch.distributed`` every rank trains on its shard of each
    global batch and rank 0 writes the checkpoint."""
    ctx = DistContext.current()
    device = local_device(config.device, ctx)
    data = load_task_data(config) if data is None else data
    out = Path(out) if out is not None else None
    runs = {kind: _ModelRun(kind, config, data, ctx, device) for kind in config.models}
    ckpt = _Checkpointer(config, runs, out, ctx)
    if resume:
        if out is None:
            raise ValueError("resume needs the run's output folder (out)")
        state = read_inverse_checkpoint(out)
        bad = changed_settings(config, state["config"])
        if bad:
            raise ValueError(f"cannot resume: settings {bad} differ from the checkpoint's; only "
                             f"{sorted(RESUMABLE)} may change")
        set_rng_state(state["rng"])
        for kind, s in state["runs"].items():
            runs[kind].restore(s)
    show = progress and ctx.is_main
    for run in runs.values():
        train_epochs(run, ckpt.save, show=show)
    ckpt.save()
    ctx.barrier()
    return InverseResult(config, {k: r.model for k, r in runs.items()}, {k: r.history for k, r in runs.items()},
                         {k: r.step for k, r in runs.items()}, all(r.done for r in runs.values()))
