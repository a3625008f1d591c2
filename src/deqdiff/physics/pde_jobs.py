"""``deqdiff pinn poisson2d`` and ``deqdiff pinn kdv``: one problem of the PDE interface, the
implicit PIDEQ and, in the same run, its baselines — the same DEQ unrolled (derivatives by
autodiff through the iterations) and an explicit MLP PINN of comparable size — each trained
with the same loss, points and schedule, evaluated against the reference.

Outputs in ``--out``: ``results.json`` (per model: relative L2 and max error vs the reference,
parameters, median epoch time, training time, graph memory of a step, final losses, forward
iterations), ``<problem>_<model>.png`` (prediction, reference, error) and
``<problem>_loss.png``; ``checkpoint_<model>.pt`` (``--resume`` continues bit-identically).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .coordinate_models import CoordinateMLP, CoordinatePIDEQ, mlp_width_for
from .pde import FixedSet, PDEProblem, ResidualResampling, Uniform
from .pde_runner import epoch_time, evaluate_pde, graph_bytes, plot_history, plot_solution, train_pde

__all__ = ["JobConfig", "PROBLEMS", "MODELS", "SAMPLERS", "TARGETS", "build_problem", "build_model", "run_job"]

PROBLEMS = ("poisson2d", "kdv")
MODELS = ("deq", "unrolled", "mlp")
SAMPLERS = ("uniform", "fixed", "rad")
#: relative L2 targets of the issue's evidence (the run says whether each model met it)
TARGETS = {"poisson2d": 1e-2, "kdv": 5e-2}
#: per problem: (epochs, collocation points, learning rate, evaluation grid)
#: default weight of the boundary/initial/periodic terms relative to the interior residual
CONDITION_WEIGHT = {"poisson2d": 100.0, "kdv": 10.0}
DEFAULTS = {"poisson2d": (1500, 500, 1e-2, (101, 101)), "kdv": (1500, 400, 1e-2, (201, 101))}


@dataclass
class JobConfig:
    """Everything that defines a run (stored in results and checkpoints)."""

    problem: str = "poisson2d"
    models: tuple[str, ...] = MODELS
    epochs: int | None = None
    collocation: int | None = None
    boundary_points: int | None = None
    condition_weight: float | None = None
    lr: float | None = None
    width: int = 24
    mlp_depth: int = 3
    tol: float = 1e-5
    max_iter: int = 100
    solver: str = "anderson"
    sampler: str = "uniform"
    rad_every: int = 100
    delta2: float = 0.0025
    T: float = 0.2
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"

    def __post_init__(self):
        if self.problem not in PROBLEMS:
            raise ValueError(f"problem: unknown {self.problem!r}; choose one of {PROBLEMS}")
        epochs, n, lr, _ = DEFAULTS[self.problem]
        self.epochs = epochs if self.epochs is None else self.epochs
        self.collocation = n if self.collocation is None else self.collocation
        self.lr = lr if self.lr is None else self.lr
        self.boundary_points = (100 if self.problem == "poisson2d" else 50) if self.boundary_points is None \
            else self.boundary_points
        # the interior residual is O(2π²) (Poisson) or O(π) (KdV) where the conditions are O(1):
        # weight the conditions up so that they are not neglected (the usual PINN loss balance)
        self.condition_weight = CONDITION_WEIGHT[self.problem] if self.condition_weight is None \
            else self.condition_weight
        self.models = tuple(self.models)
        bad = [m for m in self.models if m not in MODELS]
        if bad or not self.models or len(set(self.models)) != len(self.models):
            raise ValueError(f"models: need distinct names from {MODELS}, got {list(self.models)}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler: unknown {self.sampler!r}; choose one of {SAMPLERS}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype: must be float32 or float64, got {self.dtype!r}")
        for name in ("epochs",):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be ≥ 0")
        for name in ("collocation", "boundary_points", "width", "mlp_depth", "max_iter", "rad_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}: must be ≥ 1, got {getattr(self, name)}")
        for name in ("lr", "tol", "delta2", "T", "condition_weight"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name}: must be a finite number > 0, got {v}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"float32": torch.float32, "float64": torch.float64}[self.dtype]


def _sampler(cfg: JobConfig):
    if cfg.sampler == "fixed":
        return FixedSet(cfg.collocation)
    if cfg.sampler == "rad":
        return ResidualResampling(cfg.collocation, every=cfg.rad_every)
    return Uniform(cfg.collocation)


def build_problem(cfg: JobConfig) -> PDEProblem:
    """A fresh problem (its sampler holds per-run state)."""
    if cfg.problem == "poisson2d":
        from .poisson2d import poisson2d

        problem = poisson2d(cfg.collocation, cfg.boundary_points, collocation=_sampler(cfg))
    else:
        from .kdv import kdv

        problem = kdv(cfg.delta2, cfg.T, n_initial=2 * cfg.boundary_points, n_periodic=cfg.boundary_points,
                      collocation=_sampler(cfg))
    for condition in problem.conditions:
        condition.weight = cfg.condition_weight
    return problem


def build_model(cfg: JobConfig, kind: str, problem: PDEProblem) -> torch.nn.Module:
    """The PIDEQ (implicit or unrolled: the same weights from the same seed) or an MLP with
    ``mlp_depth`` layers and about the PIDEQ's parameter count."""
    torch.manual_seed(cfg.seed)
    bounds = list(problem.domain.bounds.values())
    if kind == "mlp":
        ref = sum(p.numel() for p in CoordinatePIDEQ(bounds, len(problem.outputs), cfg.width).parameters())
        torch.manual_seed(cfg.seed)
        width = mlp_width_for(ref, len(bounds), len(problem.outputs), cfg.mlp_depth)
        model = CoordinateMLP(bounds, len(problem.outputs), width, cfg.mlp_depth)
    else:
        model = CoordinatePIDEQ(bounds, len(problem.outputs), cfg.width, tol=cfg.tol, max_iter=cfg.max_iter,
                                solver=cfg.solver, mode="implicit" if kind == "deq" else "unrolled")
    return model.to(dtype=cfg.torch_dtype, device=cfg.device)


def _config_dict(cfg: JobConfig) -> dict:
    d = asdict(cfg)
    d["models"] = list(cfg.models)
    return d


def check_resume(cfg: JobConfig, path: Path) -> None:
    """``ValueError`` naming the settings that differ from the checkpoint's run."""
    from ..training.checkpoint import PINN_FORMAT, read_checkpoint

    try:
        state = read_checkpoint(path, format=PINN_FORMAT, unversioned=True)
    except ValueError as err:
        raise ValueError(f"--resume: {err}") from None
    saved, now = state.get("config", {}), _config_dict(cfg)
    changed = [k for k in now if k not in ("models", "device") and saved.get(k) != now[k]]
    if changed:
        what = ", ".join(f"--{k.replace('_', '-')} {now[k]} (checkpoint: {saved.get(k)})" for k in changed)
        raise ValueError(f"--resume: {what} differ from the checkpoint's run")


def run_job(cfg: JobConfig, out: Path, *, progress: bool = True, resume: bool = False,
            checkpoint_every: int = 0) -> dict:
    """Train every model of ``cfg.models`` on the problem, evaluate, write figures and JSON."""
    out = Path(out)
    sizes = DEFAULTS[cfg.problem][3]
    results: dict = {"problem": cfg.problem, "config": _config_dict(cfg), "target_rel_l2": TARGETS[cfg.problem],
                     "reference": ("analytic u = sin(πx) sin(πy)" if cfg.problem == "poisson2d" else
                                   "Fourier pseudo-spectral + ETDRK4 (512 modes, dt = 1e-4)"),
                     "models": {}, "figures": []}
    histories = {}
    for kind in cfg.models:
        problem = build_problem(cfg)
        model = build_model(cfg, kind, problem)
        ckpt = out / f"checkpoint_{kind}.pt"
        start = None
        if resume and ckpt.is_file():
            check_resume(cfg, ckpt)
            start = ckpt
        t0 = time.perf_counter()
        trainer = train_pde(problem, model, epochs=cfg.epochs, lr=cfg.lr, seed=cfg.seed, progress=progress,
                            desc=f"{cfg.problem} {kind}", checkpoint=ckpt, checkpoint_every=checkpoint_every,
                            resume=start, extra={"config": _config_dict(cfg)})
        wall = time.perf_counter() - t0
        batch = problem.sample(torch.Generator().manual_seed(cfg.seed + 1), 0, model)
        loss = problem.loss(model, batch)
        mem = graph_bytes(loss.total)
        del loss
        ev = evaluate_pde(problem, model, sizes)
        fig = plot_solution(problem, ev, out / f"{cfg.problem}_{kind}.png",
                            f"{cfg.problem}, {kind}: {sum(p.numel() for p in model.parameters())} parameters")
        results["figures"].append(str(fig))
        hist = trainer.history
        histories[kind] = hist
        last = hist[-1] if hist else {}
        iters = [h["iters_max"] for h in hist if "iters_max" in h]
        results["models"][kind] = {
            "rel_l2": ev["rel_l2"], "max_abs_error": ev["max_abs"],
            "target_met": ev["rel_l2"] <= TARGETS[cfg.problem],
            "parameters": sum(p.numel() for p in model.parameters()),
            "epoch_time_median_s": epoch_time(hist), "train_wall_s": wall,
            "graph_memory_mb": mem / 2 ** 20,
            "final_losses": {k: v for k, v in last.items() if isinstance(v, float) and k not in ("time", "cpu_time", "lr")},
            "forward_iterations_max_last": iters[-1] if iters else None,
            "skipped_steps": sum(bool(h.get("skipped")) for h in hist),
        }
        (out / "results.json").write_text(json.dumps(results, indent=1))  # each model as soon as it is done
    if histories:
        results["figures"].append(str(plot_history(histories, out / f"{cfg.problem}_loss.png", f"{cfg.problem}: training")))
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results
