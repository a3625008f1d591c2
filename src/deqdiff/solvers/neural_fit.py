"""Fitting a neural DEQ solver on a frozen DEQ (Bai, Koltun & Kolter 2022, "Neural deep equilibrium
solvers", ICLR: the three losses below are theirs).

Ground truth: the fixed points z* of the training inputs, from the library's Anderson solver at
``gt_tol`` (``deqdiff fit-solver``: the model's own tolerance — the fixed points it computes at
inference anyway), solved once and reused by every step; samples left above that tolerance are
left out and counted. First ``init_steps`` Adam steps fit the initializer alone to z* (the
initializer loss below, no f-evaluations: far cheaper than steps through the solver). Then each
fitting step draws a batch, starts from the initializer's proposal z⁰ = g_φ(x), unrolls ``unroll``
steps of the neural solver (the library's Anderson loop with the HyperAnderson mixer, recorded by
autograd through the frozen f) and minimizes the paper's three losses:

* **convergence loss** Σ_k w_k ‖z^[k] − z*‖/‖z*‖ over the unrolled steps, w_k ∝ k (later steps
  weigh more);
* **initializer loss** ‖z⁰ − z*‖/‖z*‖; the initializer's output layer is set to its
  ridge least-squares value before the first and after the last step (variable projection, the
  ridge chosen on a held-out fifth of the samples), so the gradient steps only have to move its
  hidden layers;
* **α regularization** ‖α^[k] − α*^[k]‖² toward the least-squares Anderson weights, during the
  first ``alpha_fraction`` of the steps only (the paper, too, uses it early in fitting only).

With ``initializer="kernel"`` the initializer is kernel ridge regression of z* on x
(:class:`~deqdiff.solvers.neural.KernelInitializer`): one linear solve replaces the
initializer-only steps, the ridge choice and the refits, and the unrolled steps (if any) fit the
HyperAnderson network alone. ``warm_start`` cuts the ground truth's cost with the initializer's
own progress: the first ``warm_start`` samples are solved from the DEQ's default start, a kernel
initializer fitted on them proposes the starts of the rest. ``learned_steps`` fits residual-correction
steps (:func:`~deqdiff.solvers.neural.fit_learned_steps`) on the kernel's leave-one-out starts.

``time_budget_s`` stops the gradient steps once the fit's wall time (ground truth included), or
its CPU time with ``budget_clock="cpu"``, reaches it (the steps taken are recorded; the ground
truth and the closed-form fits always run). Only the
solver's networks learn; f's parameters are never updated (the caller's ``cell`` closes
over them, e.g. a ``DEQ``'s cell in eval mode).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from .anderson import anderson
from .base import row_norm
from .neural import (INITIALIZERS, FallbackWarning, KernelInitializer, NeuralSolver, NeuralSolverConfig, fit_learned_steps,
                     neural_solver)

__all__ = ["FitConfig", "FitResult", "ground_truth", "fit_neural_solver"]


@dataclass
class FitConfig:
    """Settings of :func:`fit_neural_solver` (sizes of the networks: :class:`NeuralSolverConfig`).

    ``steps``/``batch``/``unroll``/``lr``: Adam steps through ``unroll`` unrolled solver steps;
    ``init_steps``/``init_batch``/``init_lr``: Adam steps before those that fit the initializer
    alone to z* (no f-evaluations: cheap; ``init_lr`` None: ``lr``); ``gt_tol``/``gt_max_iter``: the ground-truth solves;
    ``time_budget_s``: wall-clock limit of the whole fit (ground truth included) — with time kept
    for the final refit and the mixer-rule choice (estimated from the ridge choice and the ground
    truth), the initializer-only steps get three quarters of the time left after the ground truth
    (on the conv DEQ they gain more per second than the unrolled steps), the unrolled steps the
    rest (the steps done are recorded); None: no limit.
    ``select_tol``: keep a fifth of the inputs out of the fit (no ground truth for them: the
    initializer can interpolate its fitting samples); after fitting, solve them to this relative
    residual (at most ``select_max_iter`` iterations) with the mixer acting on the fitted
    steps only, on every step (the paper's use) and on none (plain Anderson from the
    initializer's start: a fitted mixer can be worse than none), and keep the rule with the fewest
    f-evaluations (ties: in that order); None: the fitted steps. Without unrolled steps (``steps=0``) the
    mixer stays untrained (plain Anderson) and no input is kept out.
    ``initializer``: ``"network"`` or ``"kernel"`` (module docstring); ``warm_start``: samples
    whose ground truth is solved from the default start before the rest is solved from a kernel
    initializer fitted on them (0: all from the default start); ``budget_clock``: ``"wall"`` or
    ``"cpu"`` (this process's CPU time, steadier on a shared machine). ``reset``: set the
    solver's ``reset_after`` to the mean f-evaluations of the ground-truth solves from the
    default start, rounded up, and its ``reset_need`` to their maximum (a sample that has spent
    the mean from the learned start restarts from zero when the longest default-start solve still
    fits in the iterations left; :func:`~deqdiff.solvers.neural.neural_solver`).
    ``learned_steps``: fit this many :class:`~deqdiff.solvers.neural.LearnedSteps` (kernel
    initializer only) on its leave-one-out starts of the fitting inputs; the solver takes them
    before the Anderson loop."""

    steps: int = 300
    batch: int = 64
    unroll: int = 6
    lr: float = 3e-3
    conv_weight: float = 1.0
    init_weight: float = 1.0
    alpha_weight: float = 0.1
    alpha_fraction: float = 0.5
    gt_tol: float = 1e-5
    gt_max_iter: int = 300
    init_steps: int = 0
    init_batch: int = 128
    init_lr: float | None = None
    time_budget_s: float | None = None
    select_tol: float | None = None
    select_max_iter: int = 100
    initializer: str = "network"
    warm_start: int = 0
    budget_clock: str = "wall"
    reset: bool = True
    learned_steps: int = 0
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.init_steps, bool) or int(self.init_steps) != self.init_steps or self.init_steps < 0:
            raise ValueError(f"init_steps must be an integer >= 0, got {self.init_steps!r}")
        if self.time_budget_s is not None and not (math.isfinite(self.time_budget_s) and self.time_budget_s > 0):
            raise ValueError(f"time_budget_s must be None or a finite number > 0, got {self.time_budget_s!r}")
        for name in ("steps", "warm_start", "learned_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or int(v) != v or v < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
        if self.initializer not in INITIALIZERS:
            raise ValueError(f"initializer must be one of {INITIALIZERS}, got {self.initializer!r}")
        if self.learned_steps and self.initializer != "kernel":
            raise ValueError("learned_steps need the kernel initializer (its leave-one-out predictions are their "
                             "training starts)")
        if self.budget_clock not in ("wall", "cpu"):
            raise ValueError(f"budget_clock must be 'wall' or 'cpu', got {self.budget_clock!r}")
        for name in ("batch", "unroll", "gt_max_iter", "init_batch", "select_max_iter"):
            v = getattr(self, name)
            if isinstance(v, bool) or int(v) != v or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        for name in ("lr", "gt_tol", "init_lr", "select_tol"):
            v = getattr(self, name)
            if v is None and name in ("init_lr", "select_tol"):
                continue
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        for name in ("conv_weight", "init_weight", "alpha_weight"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if not 0.0 <= self.alpha_fraction <= 1.0:
            raise ValueError(f"alpha_fraction must be in [0, 1], got {self.alpha_fraction!r}")


@dataclass
class FitResult:
    solver: NeuralSolver
    history: list[dict] = field(default_factory=list)  # per step: loss terms
    time_s: float = 0.0  # ground truth + fitting, wall clock
    cpu_time_s: float = 0.0  # the same, CPU time of this process (less sensitive to a loaded machine)
    ground_truth_time_s: float = 0.0
    samples: int = 0  # training samples used
    left_out: int = 0  # training samples whose ground truth missed gt_tol
    init_error: float = math.nan  # mean ‖g_φ(x) − z*‖/‖z*‖ on a held-out fifth of the samples, at the end
    init_steps_done: int = 0  # initializer-only steps taken (fewer than asked when the time budget ran out)
    steps_done: int = 0  # unrolled steps taken
    ground_truth_f_evals: float = math.nan  # mean f-evaluations per sample of the ground-truth solves
    phases: dict = field(default_factory=dict)  # per phase: [wall s, CPU s] (ground truth, ridge/kernel, init, unrolled, final)
    mixer_rule: dict = field(default_factory=dict)  # select_tol: mean f-evaluations per rule, and the rule kept
    initializer_fit: dict = field(default_factory=dict)  # kernel initializer: chosen width, λ, held-out errors
    learned_steps_fit: dict = field(default_factory=dict)  # learned steps: per step μ and leave-one-out errors


def _flat_map(cell: Callable[[Tensor, Tensor], Tensor], x: Tensor, state_shape: tuple[int, ...],
              row_subsets: bool = False):
    """``z ↦ cell(z, x)`` on flat states; with ``row_subsets`` also ``g(z_rows, rows=idx)`` with
    the rows' inputs (samples are independent), so the solver drops converged rows."""
    n = math.prod(state_shape)

    def g(z: Tensor, rows: Tensor | None = None) -> Tensor:
        xs = x if rows is None else x[rows]
        return cell(z.reshape(z.shape[0], *state_shape), xs).reshape(z.shape[0], n)

    g.row_subsets = row_subsets
    return g


def ground_truth(cell: Callable[[Tensor, Tensor], Tensor], x: Tensor, z0: Tensor, *, tol: float = 1e-5,
                 max_iter: int = 300, chunk: int = 1024, return_evals: bool = False):
    """Fixed points ``z* = cell(z*, x)`` ``(B, *state_shape)`` by Anderson from ``z0`` to relative
    residual ``tol``, in chunks of ``chunk`` samples; returns ``(z*, converged (B,))``, and the
    f-evaluations per sample ``(B,)`` as a third element with ``return_evals``. Converged samples
    leave the batch (``cell`` must treat samples independently, as in eval mode)."""
    shape = tuple(z0.shape[1:])
    outs, oks, evals = [], [], []
    with torch.no_grad():
        for i in range(0, x.shape[0], chunk):
            xs, zs = x[i:i + chunk], z0[i:i + chunk]
            z, info = anderson(_flat_map(cell, xs, shape, row_subsets=True), zs.reshape(zs.shape[0], -1), tol=tol,
                               max_iter=max_iter)
            outs.append(z.reshape(zs.shape))
            oks.append(info.converged)
            evals.append(info.iterations + 1)
    out = (torch.cat(outs), torch.cat(oks))
    return (*out, torch.cat(evals)) if return_evals else out


def _rel(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample ‖a − b‖/‖b‖ (differentiable in a)."""
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    return torch.linalg.vector_norm(a - b, dim=1) / row_norm(b).clamp_min(torch.finfo(b.dtype).tiny)


RIDGES = (1e-8, 1e-6, 1e-4, 1e-2, 1.0)


def _split(n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    perm = torch.randperm(n, generator=gen)
    cut = max(1, int(0.8 * n))
    return perm[:cut], perm[cut:]


def _validation_error(net: NeuralSolver, x: Tensor, z: Tensor, gen: torch.Generator, ridge: float) -> float:
    """Mean ‖g_φ(x) − z*‖/‖z*‖ on a held-out fifth of the samples, the output layer fitted on the rest."""
    fit_idx, val_idx = _split(x.shape[0], gen)
    if val_idx.numel() == 0:
        return math.nan
    net.initializer.refit_output(x[fit_idx], z[fit_idx], ridge)
    with torch.no_grad():
        return float(_rel(net.initializer(x[val_idx]), z[val_idx]).mean())


def _choose_ridge(net: NeuralSolver, x: Tensor, z: Tensor, gen: torch.Generator) -> float:
    """The output layer's ridge with the least held-out error: with as many random features as
    samples the unregularized fit interpolates them (measured: 1e-6 error on the fitting samples of
    the monotone and multiscale DEQs) and generalizes poorly."""
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    errors = {r: _validation_error(net, x, z, torch.Generator().manual_seed(seed), r) for r in RIDGES}
    finite = {r: e for r, e in errors.items() if math.isfinite(e)}
    return min(finite, key=finite.get) if finite else RIDGES[0]


def fit_neural_solver(cell: Callable[[Tensor, Tensor], Tensor], inputs: Tensor, init_state: Callable[[Tensor], Tensor],
                      *, config: NeuralSolverConfig | None = None, fit: FitConfig | None = None,
                      state_layout: tuple[tuple[int, int, int], ...] | None = None,
                      progress: bool = False, desc: str = "fit solver") -> FitResult:
    """Fit a :class:`NeuralSolver` to the frozen map ``cell(z, x)`` on the injections ``inputs``
    ``(B, *input_shape)``; ``init_state(x)`` is the DEQ's default start (for the ground truth).

    ``config`` sets the networks' sizes (its shapes are taken from the data); ``fit`` the
    optimization (:class:`FitConfig`); ``state_layout`` the ``(C, H, W)`` branches of a flat
    multiscale state (MDEQ; :class:`NeuralSolverConfig`). The networks get ``inputs``' dtype and
    device. Raises ``ValueError`` when no training sample reaches the ground-truth tolerance."""
    fit = fit or FitConfig()
    t0, c0 = time.perf_counter(), time.process_time()
    budget = math.inf if fit.time_budget_s is None else fit.time_budget_s
    kernel = fit.initializer == "kernel"

    def elapsed() -> float:  # on the budget's clock
        return time.process_time() - c0 if fit.budget_clock == "cpu" else time.perf_counter() - t0

    phases: dict[str, list[float]] = {}
    mark = [t0, c0]

    def phase(name: str) -> None:  # close the phase that ran since the last mark
        now = [time.perf_counter(), time.process_time()]
        phases[name] = [now[0] - mark[0], now[1] - mark[1]]
        mark[:] = now

    x_all = inputs.detach()
    gen = torch.Generator().manual_seed(fit.seed)
    x_select = None
    if fit.select_tol is not None and fit.steps > 0 and x_all.shape[0] >= 5:  # kept out of the fit (the initializer can
        keep, held = _split(x_all.shape[0], gen)          # interpolate its fitting samples)
        x_all, x_select = x_all[keep.to(x_all.device)], x_all[held.to(x_all.device)]
    z_star, ok, gt_evals = _warm_ground_truth(cell, x_all, init_state, fit, gen)
    n_default = fit.warm_start if 0 < fit.warm_start < x_all.shape[0] else x_all.shape[0]  # solved from the default start
    default_evals = gt_evals[:n_default][ok[:n_default]]
    reset_after = reset_need = None
    if fit.reset and default_evals.numel():
        reset_after = math.ceil(float(default_evals.double().mean()))
        reset_need = int(default_evals.max())
    t_gt = time.perf_counter() - t0
    phase("ground_truth")
    if not bool(ok.any()):
        raise ValueError(f"no training sample reached the ground-truth tolerance {fit.gt_tol:g} in "
                         f"{fit.gt_max_iter} Anderson iterations; the frozen DEQ does not converge")
    x_all, z_star = x_all[ok], z_star[ok]
    state_shape, input_shape = tuple(z_star.shape[1:]), tuple(x_all.shape[1:])
    base = config or NeuralSolverConfig(state_shape, input_shape)
    cfg = NeuralSolverConfig(**{**base.__dict__, "state_shape": state_shape, "input_shape": input_shape,
                                "state_layout": state_layout if state_layout is not None else base.state_layout,
                                "mixer_steps": fit.unroll if base.mixer_steps is None else base.mixer_steps,
                                "initializer": fit.initializer, "reset_after": reset_after, "reset_need": reset_need,
                                "kernel_centers": x_all.shape[0] if kernel else base.kernel_centers,
                                "learned_steps": 0, "step_samples": None})
    with torch.random.fork_rng(devices=[]):  # seeded weights without touching the caller's RNG
        torch.manual_seed(fit.seed)
        net = NeuralSolver(cfg).to(device=x_all.device, dtype=x_all.dtype)
    ini = net.initializer
    steps_info: dict = {}
    if kernel:  # closed form: no initializer steps, no refits
        kernel_info = ini.fit(x_all, z_star, gen, leave_one_out=bool(fit.learned_steps))
        phase("kernel")
        if fit.learned_steps:
            n_fit = x_all.shape[0]
            steps, steps_info = fit_learned_steps(_flat_map(cell, x_all, state_shape, row_subsets=True),
                                                  ini.loo_predictions.to(x_all.dtype), z_star.reshape(n_fit, -1),
                                                  fit.learned_steps)
            if steps.steps:  # the steps kept (those that beat a plain step on held-out starts)
                net.config.learned_steps, net.config.step_samples = steps.steps, n_fit
                net.steps = steps
            del ini.loo_predictions
            phase("learned_steps")
    else:
        kernel_info = {}
        ini.set_input_stats(x_all)
        ridge = _choose_ridge(net, x_all, z_star, gen)
        ini.refit_output(x_all, z_star, ridge)  # a closed-form start for the output layer
        phase("ridge")
    # keep time out of the budget for the steps: the final ridge choice and refit repeat the ridge
    # phase; the mixer-rule choice solves the held-out inputs twice, each solve about as long as the
    # ground truth's per sample (same tolerance, from a better start)
    if math.isfinite(budget):
        col = 1 if fit.budget_clock == "cpu" else 0
        n_sel = 0 if x_select is None else x_select.shape[0]
        budget -= (0.0 if kernel else 2.0 * phases["ridge"][col]) + 2.0 * phases["ground_truth"][col] * n_sel / max(1, int(ok.numel()))
    n = x_all.shape[0]
    history: list[dict] = []
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=fit.init_steps + fit.steps, desc=desc, dynamic_ncols=True, leave=False)
    net.train()
    # initializer-only steps: the initializer loss alone, no f-evaluations
    init_done = 0
    init_until = elapsed() + 0.75 * (budget - elapsed())  # the initializer-only steps' share of what is left
    if fit.init_steps and not kernel:
        opt = torch.optim.Adam(ini.parameters(), lr=fit.lr if fit.init_lr is None else fit.init_lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=fit.init_steps)
        for step in range(fit.init_steps):
            if elapsed() > init_until:
                break
            idx = torch.randperm(n, generator=gen)[:fit.init_batch].to(x_all.device)
            l_init = _rel(ini(x_all[idx]), z_star[idx]).mean()
            _clipped_step(opt, sched, l_init, ini.parameters())
            init_done += 1
            if bar is not None:
                bar.set_postfix(init=f"{float(l_init.detach()):.2e}", refresh=False)
                bar.update(1)
        ini.refit_output(x_all, z_star, ridge)
    if not kernel:
        phase("init")
    if fit.steps:  # (no optimizer without steps: creating the first one costs seconds of imports)
        opt = torch.optim.Adam(net.parameters(), lr=fit.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=fit.steps)
    weights = torch.arange(1, fit.unroll + 1, dtype=x_all.dtype, device=x_all.device)
    weights = weights / weights.sum()
    done = 0
    for step in range(fit.steps):
        if elapsed() > budget:
            break
        idx = torch.randperm(n, generator=gen)[:fit.batch].to(x_all.device)
        x, zs = x_all[idx], z_star[idx]
        z0 = ini(x)
        _, info = neural_solver(_flat_map(cell, x, state_shape), z0.reshape(z0.shape[0], -1), tol=0.0,
                                max_iter=fit.unroll, store_trajectory=True, network=net, patience=0,
                                record_alpha=True)
        traj = info.trajectory[1:]
        l_init = _rel(z0, zs).mean()
        l_conv = sum(w * _rel(z, zs).mean() for w, z in zip(weights, traj))
        terms = info.extra["alpha_terms"]
        l_alpha = torch.stack(terms).mean() if terms else z0.new_zeros(())
        use_alpha = step < fit.alpha_fraction * fit.steps
        loss = fit.conv_weight * l_conv + fit.init_weight * l_init + (fit.alpha_weight * l_alpha if use_alpha else 0.0)
        _clipped_step(opt, sched, loss, net.parameters())
        done += 1
        rec = {"step": step + 1, "loss": float(loss.detach()), "conv": float(l_conv.detach()),
               "init": float(l_init.detach()), "alpha": float(l_alpha.detach()),
               "last": float(_rel(traj[-1].detach(), zs).mean())}
        history.append(rec)
        if bar is not None:
            bar.set_postfix(init=f"{rec['init']:.2e}", last=f"{rec['last']:.2e}", refresh=False)
            bar.update(1)
    if bar is not None:
        bar.close()
    phase("unrolled")
    net.eval()
    if kernel:
        init_error = float(kernel_info.get("held_out_error", math.nan))
    else:
        ridge = _choose_ridge(net, x_all, z_star, gen)
        init_error = _validation_error(net, x_all, z_star, gen, ridge)
        ini.refit_output(x_all, z_star, ridge)  # the best output layer for the final hidden layers
    rule = {} if x_select is None or done == 0 else _select_mixer_rule(net, cell, x_select, state_shape, fit)
    if done == 0:  # an untrained mixer is plain Anderson: skip its evaluation at every step
        net.config.mixer_steps = 0
    phase("final")
    return FitResult(net, history, time.perf_counter() - t0, time.process_time() - c0, t_gt, n, int((~ok).sum()),
                     init_error, init_done, done, float(gt_evals.double().mean()), phases, rule, kernel_info, steps_info)


def _warm_ground_truth(cell, x: Tensor, init_state: Callable[[Tensor], Tensor], fit: FitConfig,
                       gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`ground_truth` of ``x``: all from ``init_state(x)``, or (``fit.warm_start`` below the
    sample count) the first ``warm_start`` from it and the rest from a kernel initializer fitted on
    those that converged (the idea of solving the ground truth with the initializer's own progress)."""
    n, k = x.shape[0], fit.warm_start
    if not 0 < k < n:
        z0 = init_state(x).detach()
        return ground_truth(cell, x, z0, tol=fit.gt_tol, max_iter=fit.gt_max_iter, return_evals=True)
    x1, x2 = x[:k], x[k:]
    z1, ok1, ev1 = ground_truth(cell, x1, init_state(x1).detach(), tol=fit.gt_tol, max_iter=fit.gt_max_iter,
                                return_evals=True)
    if int(ok1.sum()) >= 2:
        warm = KernelInitializer(tuple(x.shape[1:]), tuple(z1.shape[1:]), int(ok1.sum())).to(x.dtype)
        warm.fit(x1[ok1], z1[ok1], gen)
        with torch.no_grad():
            start = warm(x2)
        start = torch.where(torch.isfinite(start), start, init_state(x2).detach())
    else:  # nothing to learn from: the default start
        start = init_state(x2).detach()
    z2, ok2, ev2 = ground_truth(cell, x2, start, tol=fit.gt_tol, max_iter=fit.gt_max_iter, return_evals=True)
    return torch.cat([z1, z2]), torch.cat([ok1, ok2]), torch.cat([ev1, ev2])


def _clipped_step(opt: torch.optim.Optimizer, sched, loss: Tensor, params) -> None:
    """One optimizer step on ``loss`` with the gradient norm clipped to 1, then the schedule's."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()


def _select_mixer_rule(net: NeuralSolver, cell, x: Tensor, state_shape: tuple[int, ...], fit: FitConfig) -> dict:
    """Mean f-evaluations to ``fit.select_tol`` on the held-out inputs ``x`` with the mixer on the
    fitted steps, on every step and on none; sets ``net.config.mixer_steps`` to the best rule."""
    g = _flat_map(cell, x, state_shape)
    fitted_steps = net.config.mixer_steps
    evals = {}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackWarning)  # counted in the f-evaluations either way
        z0 = net.initial_state(x).reshape(x.shape[0], -1)
        rules = {"fitted_steps": fitted_steps, "every_step": None, "none": 0}
        for name, steps in rules.items():
            net.config.mixer_steps = steps
            _, info = neural_solver(g, z0, tol=fit.select_tol, max_iter=fit.select_max_iter, network=net)
            evals[name] = float((info.iterations.double() + 1).mean())
    keep = min(rules, key=lambda r: evals[r])  # ties: the first in the order above
    net.config.mixer_steps = rules[keep]
    return {"f_evals": evals, "kept": keep, "samples": int(x.shape[0])}
