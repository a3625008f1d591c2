"""``TrainConfig``: every setting of a training run (saved in checkpoints and metrics)."""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields

__all__ = ["TrainConfig"]


@dataclass
class TrainConfig:
    """Settings of :func:`deqdiff.training.train`.

    Defaults follow the training setup of Nguyen 2022 (§4.1.2 and §4.2.1): Adam with learning
    rate 1e-3 and cosine annealing; the conv DEQ solves with Anderson to relative tolerance 1e-2
    in at most 50 iterations (solver settings left at None take the model's defaults, so the
    monotone DEQs keep their splitting solver); sizes are small enough for the 8×8 digits on one
    CPU core.
    """

    # model: "conv" (DEQ of eq. 4.1), "repeat-K" (explicit, K applications), "mon", "mon-conv"
    model: str = "conv"
    channels: int = 16
    hidden: int = 32
    groups: int = 4
    pool: int = 2
    init_std: float = 0.01
    width: int = 64  # monotone models: state width (fully connected) or channels (conv)
    mon_m: float | None = None  # monotone models: margin m of I − W ⪰ mI (None: the model's default)
    mon_alpha: float | None = None  # monotone models: splitting step size (None: the model's default)
    branches: int | None = None  # mdeq: resolutions (2-4); None: 4 for images >= 32 px (CIFAR-10), else 2
    dropout: float = 0.0  # mdeq: variational dropout probability in the residual blocks
    # data
    data: str = "digits"
    data_dir: str | None = None
    test_fraction: float = 0.2  # digits only: stratified held-out fraction
    train_limit: int | None = None
    test_limit: int | None = None
    # optimization
    epochs: int = 15
    batch_size: int = 64
    eval_batch_size: int = 256
    optimizer: str = "adam"  # "adam" | "sgd"
    lr: float | None = None  # None: 1e-3 (Nguyen 2022) for conv/repeat-K, 3e-3 for the monotone models
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.0
    scheduler: str = "cosine"  # "cosine" (CosineAnnealingLR over all steps) | "none"
    grad_clip: float | None = None
    # equilibrium solve (DEQ models)
    solver: str | None = None  # None: the model's default (anderson; splitting for monotone)
    tol: float | None = None  # relative residual; None: the model's default (conv: 1e-2)
    max_iter: int | None = None  # None: the model's default (conv: 50)
    backward_tol: float | None = None
    backward_max_iter: int | None = None
    # Jacobian regularization (Bai et al. 2021): weight · Hutchinson estimate of ‖J_f‖_F²/N at z*
    jac_reg: float = 0.0
    jac_reg_samples: int = 1
    # training tools (deqdiff.training.tools): backward mode (Geng et al. 2021 phantom gradients),
    # fixed-point correction (Bai et al. 2022), cell normalization, torch.compile of the cell
    grad: str = "exact"  # "exact" (implicit, every order) | "phantom"
    phantom_steps: int = 5
    phantom_damping: float = 0.5
    correction: list[int] | None = None  # solver iterations whose states are also supervised
    correction_weights: list[float] | None = None  # None: 0.8^(n+1-i) (final state: 1)
    cell_norm: str = "none"  # "none" | "weight" | "spectral"
    compile: bool = False
    # run
    seed: int = 0
    dtype: str = "float32"  # parameters and states: "float32" | "float64"
    amp: str | None = None  # "bf16" | "fp16" (CUDA, loss scaling): autocast of the cell, solver in float32
    device: str = "cpu"
    out: str | None = None  # run directory (checkpoint.pt, metrics.json); None: keep nothing on disk
    checkpoint_every: int = 0  # also checkpoint every this many steps (0: at epoch ends only)
    max_steps: int | None = None  # stop (and checkpoint) after this many optimizer steps in total
    progress: bool = True

    def __post_init__(self):
        if self.lr is None:
            # measured on digits (15 epochs): mon reaches 96.7 % at 1e-3 and 97.5 % at 3e-3
            self.lr = 3e-3 if self.model.startswith("mon") else 1e-3
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if self.scheduler not in ("cosine", "none"):
            raise ValueError(f"scheduler must be 'cosine' or 'none', got {self.scheduler!r}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")
        if self.amp not in (None, "bf16", "fp16"):
            raise ValueError(f"amp must be None, 'bf16' or 'fp16', got {self.amp!r}")
        # every number is checked here, so that a bad value fails now and names its setting,
        # not deep inside training (NaN passes every comparison, so test finiteness explicitly)
        for name in ("channels", "hidden", "groups", "pool", "width", "epochs", "batch_size", "eval_batch_size",
                     "max_iter", "backward_max_iter", "jac_reg_samples", "train_limit", "test_limit", "branches"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1):
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        for name in ("checkpoint_every", "max_steps", "seed"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0):
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
        for name, lower, strict in (("lr", 0.0, True), ("tol", 0.0, True), ("backward_tol", 0.0, True),
                                    ("grad_clip", 0.0, True), ("mon_m", 0.0, True), ("mon_alpha", 0.0, True),
                                    ("init_std", 0.0, False), ("weight_decay", 0.0, False), ("momentum", 0.0, False),
                                    ("jac_reg", 0.0, False)):
            v = getattr(self, name)
            if v is None:
                continue
            bad = isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v)
            if bad or v < lower or (strict and v == lower):
                raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {lower:g}, got {v!r}")
        if self.branches is not None and not 2 <= self.branches <= 4:
            raise ValueError(f"branches must be 2, 3 or 4, got {self.branches!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, numbers.Real) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction!r}")
        from .tools import check_tools

        check_tools(self)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training settings {unknown}")
        return cls(**d)
