"""Neural solvers for trained runs (``deqdiff fit-solver``): load a run, fit, compare solvers.

:func:`load_run` rebuilds the frozen model of a run directory written by ``deqdiff train``
(conv DEQ, monotone DEQs, and any DEQ family ``build_model`` knows), ``deqdiff pinn vdp`` (the
physics-informed DEQ), ``deqdiff pinn poisson2d|kdv`` (the implicit PIDEQ of a PDE) or
``deqdiff inverse`` (the deblurring/denoising DEQ), with fitting inputs, held-out inputs, the
downstream metric and the run's own training time.
:func:`fit_run` fits a neural solver (Bai, Koltun & Kolter 2022) to the run's
DEQ; :func:`compare_solvers` measures, on the held-out inputs, the forward evaluations each solver
needs to reach the model's tolerance and the residual and downstream metric at fixed budgets of
f-evaluations.

f-evaluations: a solve that stops at iteration k evaluated f k + 1 times (k = 0 evaluates the
start) — the same count for every solver compared (Anderson, Broyden, plain iteration and the
neural solver evaluate f once per iteration, without line searches); the neural solver's
initializer is one extra network call, reported as wall time (:func:`initializer_cost`), not as an
f-evaluation.
"""

from __future__ import annotations

import json
import math
import pickle
import struct
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from ..solvers.neural import FallbackWarning, NeuralSolver, NeuralSolverConfig
from ..solvers.neural_fit import FitConfig, FitResult, fit_neural_solver
from .checkpoint import FORMAT, PINN_FORMAT
from .inverse import INVERSE_FORMAT
from .jacobian import capture_equilibrium

__all__ = ["Run", "load_run", "fit_run", "compare_solvers", "SOLVERS"]

#: the solvers compared with the fitted one, as ``fixed_point`` options
SOLVERS = {"anderson": {"solver": "anderson"}, "broyden": {"solver": "broyden"}, "fixed_point": {"solver": "fixed_point"}}


@dataclass
class Run:
    """A trained run's frozen model and what the solver comparison needs.

    ``metric(outputs)`` maps the model's outputs on ``test_inputs`` to the downstream metric
    ``metric_name`` (``higher_is_better`` says its direction); ``training_time_s`` is the run's own
    training time (wall clock, from its metrics), ``training_cpu_time_s`` its CPU time where the
    run recorded it (None otherwise)."""

    kind: str
    model: nn.Module
    train_inputs: Tensor
    test_inputs: Tensor
    metric: Callable[[Tensor], float]
    metric_name: str
    higher_is_better: bool
    training_time_s: float
    tol: float
    max_iter: int
    own_solver: str | None = None  # the model's default solver when it is not one of SOLVERS
    training_cpu_time_s: float | None = None

    @property
    def deq(self) -> nn.Module:
        return self.model.deq


def _json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (the run's metrics, written with its checkpoint)")
    with open(path) as fh:
        return json.load(fh)


def load_run(run_dir: str | Path, *, fit_samples: int = 512, seed: int = 0) -> Run:
    """The run in ``run_dir``. ``FileNotFoundError`` when it holds no checkpoint or metrics,
    ``ValueError`` when the checkpoint is of a model kind without an equilibrium layer or unknown
    here (the message names the kind)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    ckpt = run_dir / "checkpoint.pt"
    if not ckpt.is_file() and (run_dir / "checkpoint_deq.pt").is_file():  # `deqdiff pinn poisson2d|kdv`
        ckpt = run_dir / "checkpoint_deq.pt"
    if not ckpt.is_file():
        raise FileNotFoundError(f"no checkpoint.pt in {run_dir} (a run written by `deqdiff train` or `deqdiff pinn vdp`; "
                                "checkpoint_deq.pt for `deqdiff pinn poisson2d|kdv`)")
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, struct.error) as err:  # truncated or foreign
        first = (str(err).strip() or type(err).__name__).splitlines()[0]
        raise ValueError(f"{ckpt} is not a readable deqdiff checkpoint ({first})") from err
    tag = state.get("format") if isinstance(state, dict) else None
    if tag == FORMAT:
        return _classification_run(run_dir, fit_samples, seed)
    if tag == INVERSE_FORMAT:
        return _inverse_run(run_dir, state, fit_samples, seed)
    if tag == PINN_FORMAT:
        config = state.get("config") or {}
        if config.get("setup") in ("conditioned", "pideq") and "mu" in config:
            return _vdp_run(run_dir, state, fit_samples, seed)
        if config.get("problem") in PDE_JOB_PROBLEMS and ckpt.name == "checkpoint_deq.pt":
            return _pde_job_run(run_dir, state, fit_samples, seed)
        raise ValueError(f"{ckpt}: unknown model kind (a physics-informed run other than `deqdiff pinn vdp`, "
                         f"`deqdiff pinn poisson2d` or `deqdiff pinn kdv`)")
    raise ValueError(f"{ckpt}: unknown model kind (checkpoint format {tag!r})")


def _classification_run(run_dir: Path, fit_samples: int, seed: int) -> Run:
    from ..data import load_dataset
    from .checkpoint import load_checkpoint

    loaded = load_checkpoint(run_dir, device="cpu")
    model, config = loaded.model, loaded.config
    if getattr(model, "deq", None) is None:
        raise ValueError(f"{run_dir}: model kind {config.model!r} has no equilibrium layer (nothing to solve)")
    data = load_dataset(config.data, config.data_dir, seed=config.seed, test_fraction=config.test_fraction)
    if config.train_limit or config.test_limit:  # the run's own subsets
        data = data.limit(config.train_limit, config.test_limit)
    dtype = getattr(torch, config.dtype)
    gen = torch.Generator().manual_seed(seed)
    train_idx = torch.randperm(data.size("train"), generator=gen)[:fit_samples]
    test_idx = torch.arange(data.size("test"))
    labels = data.labels("test", test_idx)
    metrics = _json(run_dir / "metrics.json")
    epochs = metrics.get("epochs", [])
    train_time = float(sum(e["time_s"] for e in epochs))
    cpu = [e.get("cpu_time_s") for e in epochs]
    train_cpu = float(sum(cpu)) if cpu and all(c is not None for c in cpu) else None
    opts = _deq_options(model)
    own = getattr(model, "solver", None) or opts.get("solver", "anderson")
    return Run(kind=config.model, model=model, train_inputs=data.images("train", train_idx, dtype=dtype),
               test_inputs=data.images("test", test_idx, dtype=dtype),
               metric=lambda logits: float((logits.argmax(1) == labels).double().mean()),
               metric_name="test accuracy", higher_is_better=True, training_time_s=train_time,
               tol=float(opts.get("tol", 1e-6)), max_iter=int(opts.get("max_iter", 200)),
               own_solver=own if own not in SOLVERS else None, training_cpu_time_s=train_cpu)


def _deq_options(model: nn.Module) -> dict:
    """The solve settings the model uses by default (monotone models keep theirs apart)."""
    return {**model.deq.solver_options, **getattr(model, "solver_options", {})}


def _vdp_run(run_dir: Path, state: dict, fit_samples: int, seed: int) -> Run:
    from ..physics.metrics import relative_l2
    from ..physics.problems import reference_flow, reference_trajectory
    from ..physics.vdp import VdPConfig, build_model, held_out_states

    cfg = VdPConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in state["config"].items()})
    cfg.validate()
    if cfg.model == "mlp":
        raise ValueError(f"{run_dir}: model kind 'mlp' (an explicit PINN) has no equilibrium layer")
    dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
    model = build_model(cfg).to(dtype=dtype)
    model.load_state_dict(state["model"])
    core = model.core if cfg.setup == "conditioned" else model
    core.set_mode("implicit")  # an unrolled run's weights solve the same equilibrium implicitly
    model.eval()
    gen = torch.Generator().manual_seed(10_000 + seed)
    if cfg.setup == "conditioned":
        u = torch.rand(fit_samples, 3, generator=gen, dtype=torch.float64)
        box = torch.tensor(cfg.box, dtype=torch.float64)
        train = torch.cat([u[:, :1] * cfg.horizon, (2 * u[:, 1:] - 1) * box,
                           torch.full((fit_samples, 1), cfg.mu, dtype=torch.float64)], 1)
        dts, y0s = np.linspace(0, cfg.horizon, 21), held_out_states(cfg)
        ref = reference_flow(y0s, dts, cfg.mu)
        test = np.concatenate([np.broadcast_to(dts[None, :, None], (len(y0s), len(dts), 1)),
                               np.broadcast_to(y0s[:, None, :], (len(y0s), len(dts), 2)),
                               np.full((len(y0s), len(dts), 1), cfg.mu)], 2).reshape(-1, 4)
    else:
        train = torch.rand(fit_samples, 1, generator=gen, dtype=torch.float64) * cfg.t_end
        t = np.linspace(0, cfg.t_end, 201)
        ref, test = reference_trajectory(cfg.y0, t, cfg.mu), t[:, None]

    def metric(pred: Tensor) -> float:
        return relative_l2(pred.detach().double().numpy().reshape(ref.shape), ref)

    results = _json(run_dir / "results.json")
    return Run(kind=f"pinn-vdp-{cfg.setup}", model=model, train_inputs=train.to(dtype),
               test_inputs=torch.as_tensor(test, dtype=dtype), metric=metric,
               metric_name="held-out relative L2 error", higher_is_better=False,
               training_time_s=float(results["training"]["train_time_s"]), tol=cfg.tol, max_iter=cfg.max_iter,
               own_solver=cfg.solver if cfg.solver not in SOLVERS else None,
               training_cpu_time_s=_positive_or_none(results["training"].get("train_cpu_time_s")))


def _inverse_run(run_dir: Path, state: dict, fit_samples: int, seed: int) -> Run:
    """The DEQ of a ``deqdiff inverse deblur|denoise`` run (Gilton, Ongie & Willett 2021): fitting
    inputs the measurements y of training images, held-out inputs those of the held-out split,
    metric the mean PSNR (dB, peak 1) of the reconstructions, training time (wall, and CPU where
    recorded) from the checkpoint's per-epoch history of the DEQ."""
    from ..models.inverse import psnr
    from .inverse import InverseConfig, build_inverse_model, load_task_data

    try:
        config = InverseConfig.from_dict(state["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{run_dir}: unreadable inverse-problem run configuration ({err})") from err
    runs = state.get("runs") or {}
    if "deq" not in runs:
        raise ValueError(f"{run_dir}: model kind 'unrolled' (the inverse-problem run trained no DEQ) has no "
                         "equilibrium layer")
    data = load_task_data(config)
    model = build_inverse_model(InverseConfig.from_dict({**config.to_dict(), "device": "cpu"}), "deq",
                                data.image_shape[0])
    model.load_state_dict(runs["deq"]["model"])
    model.eval()
    dtype = getattr(torch, config.dtype)
    train_idx = torch.randperm(data.size("train"), generator=torch.Generator().manual_seed(seed))[:fit_samples]
    y_train, _ = data.batch("train", train_idx, dtype=dtype)
    y_test, x_test = data.batch("test", torch.arange(data.size("test")), dtype=dtype)
    epochs = (runs["deq"].get("history") or {}).get("epochs", [])
    cpu = [e.get("cpu_time_s") for e in epochs]
    opts = _deq_options(model)
    own = opts.get("solver", "anderson")
    return Run(kind=f"inverse-{config.task}", model=model, train_inputs=y_train, test_inputs=y_test,
               metric=lambda out: float(psnr(out.detach(), x_test).double().mean()), metric_name="test PSNR (dB)",
               higher_is_better=True, training_time_s=float(sum(e["time_s"] for e in epochs)),
               tol=float(opts.get("tol", 1e-4)), max_iter=int(opts.get("max_iter", 50)),
               own_solver=own if own not in SOLVERS else None,
               training_cpu_time_s=float(sum(cpu)) if cpu and all(c is not None for c in cpu) else None)


#: problems of ``deqdiff pinn`` trained through :mod:`deqdiff.physics.pde_jobs` (the implicit PIDEQ's run)
PDE_JOB_PROBLEMS = ("poisson2d", "kdv")


def _pde_job_run(run_dir: Path, state: dict, fit_samples: int, seed: int) -> Run:
    """The implicit PIDEQ of a ``deqdiff pinn poisson2d|kdv`` run (``checkpoint_deq.pt``): fitting
    inputs uniform in the problem's box, held-out inputs its evaluation grid, metric the relative
    L2 error against the problem's reference there (as the run's own ``results.json``); training
    time from the checkpoint's per-step history (wall and CPU time of every optimizer step)."""
    from ..physics.pde_jobs import DEFAULTS, JobConfig, build_model, build_problem

    fields = JobConfig.__dataclass_fields__
    try:
        cfg = JobConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in state["config"].items() if k in fields})
    except (TypeError, ValueError) as err:
        raise ValueError(f"{run_dir}: unreadable PDE run configuration ({err})") from err
    problem = build_problem(cfg)
    model = build_model(cfg, "deq", problem)
    model.load_state_dict(state["model"])
    model.eval()
    dtype = cfg.torch_dtype
    train = problem.domain.sample(fit_samples, torch.Generator().manual_seed(10_000 + seed))
    _, grid = problem.domain.grid(DEFAULTS[cfg.problem][3])
    ref = np.asarray(problem.reference(grid), dtype=np.float64).reshape(grid.shape[0], -1)

    def metric(pred: Tensor) -> float:
        err = pred.detach().double().numpy().reshape(ref.shape) - ref
        return float(np.linalg.norm(err) / max(np.linalg.norm(ref), 1e-300))

    history = state.get("history") or []
    steps = [h for h in history if isinstance(h, dict) and "time" in h]
    wall = float(sum(h["time"] for h in steps))
    cpu = [h.get("cpu_time") for h in steps]
    train_cpu = float(sum(cpu)) if cpu and all(isinstance(c, (int, float)) for c in cpu) else None
    return Run(kind=f"pinn-{cfg.problem}", model=model, train_inputs=train.to(dtype),
               test_inputs=torch.as_tensor(grid, dtype=dtype), metric=metric,
               metric_name="relative L2 error on the evaluation grid", higher_is_better=False,
               training_time_s=wall, tol=cfg.tol, max_iter=cfg.max_iter,
               own_solver=cfg.solver if cfg.solver not in SOLVERS else None,
               training_cpu_time_s=_positive_or_none(train_cpu))


def _positive_or_none(v) -> float | None:
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) and v > 0 else None


def fit_budget(run: Run, share: float) -> tuple[float, str]:
    """``(seconds, clock)``: ``share`` of the run's training CPU time on the CPU clock where the
    run recorded it (steadier on a shared machine), else of its wall time on the wall clock.
    ``ValueError`` when the run records neither."""
    if run.training_cpu_time_s:
        return share * run.training_cpu_time_s, "cpu"
    if run.training_time_s > 0:
        return share * run.training_time_s, "wall"
    raise ValueError("the run records no training time")


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)


def injections(run: Run, inputs: Tensor) -> Tensor:
    """The inputs the run's DEQ receives (its injection x) for model ``inputs``."""
    with torch.no_grad(), capture_equilibrium(run.model) as box:
        run.model(inputs, max_iter=1, on_fail="ignore")
    return box["x"].detach()


def fit_run(run: Run, *, config: NeuralSolverConfig | None = None, fit: FitConfig | None = None,
            progress: bool = False) -> FitResult:
    """Fit a neural solver to the run's frozen DEQ on its fitting inputs."""
    deq = run.deq
    x = injections(run, run.train_inputs)
    layout = state_layout(deq.cell, x)
    with _frozen(run.model):
        return fit_neural_solver(lambda z, xx: deq.cell(z, xx), x, deq.init_state, config=config, fit=fit,
                                 state_layout=layout, progress=progress, desc=f"fit solver ({run.kind})")


def state_layout(cell: nn.Module, x: Tensor) -> tuple[tuple[int, int, int], ...] | None:
    """The ``(C, H, W)`` branches of a flat multiscale state (a cell with ``branch_shapes``, as
    the MDEQ's), for the neural solver's convolutional initializer; None for other cells."""
    shapes = getattr(cell, "branch_shapes", None)
    return tuple(tuple(int(n) for n in b) for b in shapes(x)) if callable(shapes) else None


def _solve(run: Run, options: dict, network: NeuralSolver | None, **overrides) -> tuple[Tensor, dict, float]:
    """Model outputs on the held-out inputs, the forward solve's statistics, and wall time."""
    deq = run.deq
    opts = dict(options, on_fail="ignore", **overrides)
    t0 = time.perf_counter()
    with torch.no_grad():
        if network is None:
            out = run.model(run.test_inputs, **opts)
        else:
            with network.attached(deq):
                out = run.model(run.test_inputs, **opts, **network.solver_options())
    wall = time.perf_counter() - t0
    info = deq.last_info.forward
    evals = info.iterations.double() + 1
    rel = info.rel_residual.double()
    stats = {"f_evals_mean": float(evals.mean()), "f_evals_median": float(evals.median()),
             "f_evals_max": int(evals.max()), "converged": float(info.converged.double().mean()),
             "rel_residual_mean": float(rel.mean()), "rel_residual_median": float(rel.median()),
             "rel_residual_max": float(rel.max()), "fallback_samples": int(info.extra.get("fallback_samples", 0)),
             "f_evals_counts": torch.bincount(evals.long()).tolist(),  # samples per f-evaluation count
             "reset_samples": int(info.extra.get("reset_samples", 0))}
    return out, stats, wall


def compare_solvers(run: Run, network: NeuralSolver, budgets: list[int], *, progress: bool = False) -> dict:
    """Per solver (neural, Anderson, Broyden, plain iteration, and the model's own if another):
    ``at_tol`` — f-evaluations to reach the model's tolerance (within its max_iter) and the
    downstream metric there; ``budgets`` — relative residual and metric after at most b
    f-evaluations (b ≥ 2) for each b."""
    solvers: dict[str, tuple[dict, NeuralSolver | None]] = {"neural": ({}, network)}
    solvers.update({k: (v, None) for k, v in SOLVERS.items()})
    if run.own_solver is not None:
        solvers[run.own_solver] = ({"solver": run.own_solver}, None)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(solvers) * (1 + len(budgets)), desc=f"compare solvers ({run.kind})", dynamic_ncols=True,
                   leave=False)
    out: dict[str, dict] = {}
    for name, (opts, net) in solvers.items():
        y, stats, wall = _solve(run, opts, net, tol=run.tol, max_iter=run.max_iter)
        rec = {"at_tol": {**stats, "metric": run.metric(y), "time_s": wall}, "budgets": []}
        if bar is not None:
            bar.update(1)
        for b in budgets:
            with warnings.catch_warnings():  # at tol = 0 rows stall at rounding level; counted in stats
                warnings.simplefilter("ignore", FallbackWarning)
                y, stats, wall = _solve(run, opts, net, tol=0.0, max_iter=b - 1)
            rec["budgets"].append({"f_evals": b, **stats, "metric": run.metric(y), "time_s": wall})
            if bar is not None:
                bar.update(1)
        out[name] = rec
    if bar is not None:
        bar.close()
    return out


def plot_comparison(results: dict, run: Run, path: Path) -> Path:
    """Residual and downstream metric vs f-evaluations (two panels), one line per solver."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, rec in results.items():
        b = [r["f_evals"] for r in rec["budgets"]]
        ax1.semilogy(b, [max(r["rel_residual_mean"], 1e-30) for r in rec["budgets"]], marker="o", label=name)
        ax2.plot(b, [r["metric"] for r in rec["budgets"]], marker="o", label=name)
    ax1.axhline(run.tol, color="gray", ls="--", lw=1, label=f"model tol {run.tol:g}")
    ax1.set(xlabel="f evaluations", ylabel="mean relative residual ‖f(z)−z‖/‖f(z)‖", title=f"{run.kind}: residual")
    ax2.set(xlabel="f evaluations", ylabel=run.metric_name, title=f"{run.kind}: {run.metric_name}")
    if not run.higher_is_better:
        ax2.set_yscale("log")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def default_gt_tol(run: Run) -> float:
    """Ground truth at the model's own tolerance (the fixed points it computes at inference: the
    initializer's held-out error is 0.2–0.4 of ‖z*‖ on the digit DEQs, far above the error of z*
    at that tolerance, and a 100× tighter solve cost 3–5× the f-evaluations), within what its
    dtype resolves."""
    eps = torch.finfo(run.train_inputs.dtype).eps
    return max(run.tol, 20 * eps)


def initializer_cost(run: Run, network: NeuralSolver, repeats: int = 7) -> dict:
    """Wall time of one initializer call and of one evaluation of f on the held-out injections
    (medians of ``repeats``) and their ratio: the initializer's cost in f-evaluations, which the
    f-evaluation counts leave out."""
    x = injections(run, run.test_inputs)
    z = run.deq.init_state(x)
    cell = run.deq.cell

    def median(fn) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return float(np.median(times))

    with torch.no_grad():
        t_init, t_f = median(lambda: network.initial_state(x)), median(lambda: cell(z, x))
    return {"initializer_time_s": t_init, "f_eval_time_s": t_f, "initializer_cost_f_evals": t_init / t_f}


def start_residuals(run: Run, network: NeuralSolver) -> dict:
    """Mean relative residual ‖f(z⁰) − z⁰‖/‖f(z⁰)‖ on the held-out injections at the
    initializer's start and at the DEQ's default start (where the f-evaluations go: the start
    against the steps)."""
    x = injections(run, run.test_inputs)
    cell = run.deq.cell

    def rel(a: Tensor, b: Tensor) -> float:
        a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
        return float((torch.linalg.vector_norm(a - b, dim=1) / torch.linalg.vector_norm(b, dim=1).clamp_min(1e-30)).mean())

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackWarning)
        z_n, z_d = network.initial_state(x), run.deq.init_state(x)
        return {"start_rel_residual_neural": rel(z_n, cell(z_n, x)), "start_rel_residual_default": rel(z_d, cell(z_d, x))}


def summary(run: Run, fit: FitResult, results: dict) -> dict:
    """The headline numbers: f-evaluation ratio neural/Anderson at the model's tolerance, the
    metric of each, and fitting time as a share of the run's training time (wall clock, and CPU
    time where the run recorded it; the time target is judged on CPU time then)."""
    n, a = results["neural"]["at_tol"], results["anderson"]["at_tol"]
    ratio = n["f_evals_mean"] / a["f_evals_mean"]
    share = fit.time_s / run.training_time_s if run.training_time_s > 0 else math.inf
    cpu_share = fit.cpu_time_s / run.training_cpu_time_s if run.training_cpu_time_s else None
    return {"kind": run.kind, "tol": run.tol, "f_evals_neural": n["f_evals_mean"], "f_evals_anderson": a["f_evals_mean"],
            "f_evals_ratio": ratio, "metric_name": run.metric_name, "metric_neural": n["metric"],
            "metric_anderson": a["metric"], "converged_neural": n["converged"], "converged_anderson": a["converged"],
            "fit_time_s": fit.time_s, "fit_cpu_time_s": fit.cpu_time_s, "ground_truth_time_s": fit.ground_truth_time_s,
            "ground_truth_f_evals": fit.ground_truth_f_evals, "fit_phases_wall_cpu_s": fit.phases,
            "fit_samples_used": fit.samples, "init_steps_done": fit.init_steps_done, "steps_done": fit.steps_done,
            "mixer_rule": fit.mixer_rule, "initializer": fit.solver.config.initializer,
            "reset_after": fit.solver.config.reset_after, "reset_samples": n.get("reset_samples", 0),
            **start_residuals(run, fit.solver),
            "f_evals_counts_neural": n.get("f_evals_counts"), "f_evals_counts_anderson": a.get("f_evals_counts"),
            "initializer_fit": fit.initializer_fit, "learned_steps": fit.solver.config.learned_steps,
            "learned_steps_fit": fit.learned_steps_fit,
            "init_error": fit.init_error, **initializer_cost(run, fit.solver),
            "time_neural_s": n["time_s"], "time_anderson_s": a["time_s"],
            "training_time_s": run.training_time_s, "fit_time_share": share,
            "training_cpu_time_s": run.training_cpu_time_s, "fit_cpu_share": cpu_share,
            "target_f_evals_ratio_met": bool(ratio <= 0.5 and n["converged"] >= a["converged"]),
            "target_fit_time_met": bool((share if cpu_share is None else cpu_share) <= 0.05)}
