"""``deqdiff pinn <problem>``: physics-informed DEQs trained with implicit higher derivatives.

* ``deqdiff pinn vdp`` — Van der Pol (:mod:`deqdiff.physics.vdp`); ``--setup conditioned``
  (default: a flow map conditioned on the initial state, rolled out to t = 20) or ``pideq``
  (the PIDEQ paper's setup, Pacheco & Camponogara 2022). Writes figures, ``results.json`` and ``checkpoint.pt`` to ``--out``.
  ``--mu-range LO HI`` trains one flow map for the whole family μ ∈ [LO, HI] and reports errors
  per μ, held-out inside the range and extrapolated just outside (:mod:`deqdiff.physics.vdp_family`).
* ``deqdiff pinn burgers`` (and ``heat``) — the PDE problems of :mod:`deqdiff.physics.burgers`.
* ``deqdiff pinn poisson2d`` and ``deqdiff pinn kdv`` — problems of the PDE interface
  (:mod:`deqdiff.physics.pde`), each trained as the implicit PIDEQ and, in the same run, the
  unrolled PIDEQ and an MLP PINN of comparable size (:mod:`deqdiff.physics.pde_jobs`).
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys

from ._common import (resume_checkpoint, UsageError, check_device, check_solver, nonneg_int, one_line, out_dir, positive_float,
                      positive_int, seed, str_list, user_errors)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pinn", help="physics-informed DEQs (Van der Pol, Burgers, …)",
                       description="Train a physics-informed DEQ; derivatives of every order are implicit solves.")
    problems = p.add_subparsers(dest="problem", required=True, metavar="PROBLEM")
    _register_vdp(problems)
    _register_pde(problems)
    _register_interface_problems(problems)


def _register_vdp(problems) -> None:
    from ..physics.vdp import SETUPS, VdPConfig  # light: no training happens at import

    d = VdPConfig()
    v = problems.add_parser(
        "vdp", help="Van der Pol oscillator (default: flow map conditioned on y0, rolled out to t=20)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = v.add_argument
    a("--setup", choices=SETUPS, default="conditioned",
      help="'conditioned': y(Δ; y0, μ) over a short horizon, rolled out; 'pideq': the PIDEQ paper's setup")
    a("--out", default="runs/pinn_vdp", help="output folder (figures, results.json, checkpoint.pt)")
    a("--device", default="cpu", help="cpu, cuda, cuda:1 …")
    a("--epochs", type=int, default=None, help="Adam epochs (one fresh batch each); default per setup")
    a("--seed", type=int, default=0)
    a("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
      help="continue bit-identically from CHECKPOINT (default: OUT/checkpoint.pt); a different --epochs "
           "(in the Adam phase) or --lbfgs-steps extends or shortens the run")
    a("--checkpoint-every", type=nonneg_int, default=250,
      help="write OUT/checkpoint.pt every this many epochs (0: at the end only)")
    a("--model", choices=("pideq", "unrolled", "mlp"), default="pideq",
      help="pideq: implicit DEQ; unrolled: same DEQ by unrolled autodiff through the --solver loop "
           "(the PIDEQ paper's baseline); mlp: explicit PINN")
    a("--width", type=int, default=None, help="DEQ states / MLP hidden width (default: 64 conditioned, 80 pideq)")
    a("--batch", type=int, default=None, help="collocation points per epoch")
    a("--lr", type=float, default=None, help="initial Adam learning rate")
    a("--lr-final", type=float, default=None, help="learning rate at the last Adam epoch (exponential decay)")
    a("--lbfgs-steps", type=int, default=None, help="L-BFGS steps after Adam")
    mu = v.add_mutually_exclusive_group()
    mu.add_argument("--mu", type=float, default=d.mu, help="Van der Pol μ")
    mu.add_argument("--mu-range", type=float, nargs=2, metavar=("LO", "HI"), default=None,
                    help="conditioned: train one flow map for the whole family μ ∈ [LO, HI] (μ drawn per "
                         "collocation point) and evaluate per μ on held-out values inside and two just outside")
    a("--horizon", type=float, default=None, help="conditioned: prediction horizon h (Δ ∈ [0, h])")
    a("--t-end", type=float, default=None, help="pideq: end of the time interval")
    a("--rollout-t-end", type=float, default=None, help="conditioned: length of the simulated trajectory")
    a("--n-test", type=int, default=None, help="conditioned: held-out initial states")
    a("--physics-weight", type=float, default=None, help="λ, weight of the physics residual")
    a("--jacobian-weight", type=float, default=None, help="κ, weight of ‖∂f/∂z‖_F (exact closed form)")
    a("--taylor", type=int, choices=(0, 1, 2), default=None,
      help="conditioned: order of the exact Taylor skip (the DEQ learns the O(Δ^(order+1)) remainder)")
    a("--spectral-norm", type=float, default=None, help="bound ρ on the DEQ's ‖A‖₂ (cached power iteration)")
    a("--tol", type=float, default=None, help="forward solver tolerance (relative residual)")
    a("--solver", default=None, help="forward solver (auto, anderson, broyden, fixed_point, …; default: anderson "
      "conditioned, auto pideq — the paper's Anderson is --solver anderson)")
    a("--dtype", choices=("float32", "float64"), default=None)
    # 1 thread: the matrices are tiny (width 64, 256 points), so more intra-op threads spend CPU
    # on synchronization (measured: 2 threads used >3× the CPU time of 1 for the default run).
    a("--threads", type=nonneg_int, default=1, help="torch CPU threads (0: torch's default)")
    a("--no-progress", action="store_true", help="no progress bar")
    a("--no-plots", action="store_true", help="skip the PNG figures")
    v.set_defaults(func=_run_vdp)


def _register_pde(problems) -> None:
    """``burgers`` (and ``heat``) come from :mod:`deqdiff.physics.burgers`; guarded so that a
    missing or broken module never takes ``deqdiff pinn vdp`` down with it."""
    try:
        mod = importlib.import_module("deqdiff.physics.burgers")
        names = [n for n in getattr(mod, "PROBLEMS", {"burgers": None}) if n in ("burgers", "heat")] or ["burgers"]
    except Exception as err:  # noqa: BLE001 — reported when the job is asked for
        q = problems.add_parser("burgers", help="1D viscous Burgers (unavailable: see error)")
        q.set_defaults(func=lambda args, err=err: _unavailable("burgers", err))
        return
    for name in names:
        q = problems.add_parser(name, help=f"1D {'viscous Burgers' if name == 'burgers' else 'heat'} equation "
                                "(second spatial derivative: third-order implicit differentiation)")
        if name == "burgers":
            mod.add_arguments(q)
        else:
            mod.add_arguments(q, problem=name)
        q.set_defaults(func=_run_pde)


_INTERFACE_HELP = {
    "poisson2d": "2-D Poisson −Δu = 2π² sin(πx) sin(πy) on the unit square (analytic reference), with baselines",
    "kdv": "KdV u_t + u u_x + δ² u_xxx = 0, periodic (spectral ETDRK4 reference), with baselines",
}


def _register_interface_problems(problems) -> None:
    from ..physics.pde_jobs import DEFAULTS, MODELS, SAMPLERS, JobConfig

    for name, help_text in _INTERFACE_HELP.items():
        epochs, n, lr, _ = DEFAULTS[name]
        d = JobConfig(problem=name)
        q = problems.add_parser(name, help=help_text, description=help_text + ".",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        a = q.add_argument
        a("--out", default=f"runs/pinn_{name}", help="output folder (figures, results.json, checkpoints)")
        a("--models", type=str_list, default=list(MODELS),
          help=f"comma-separated models trained in this run, from {','.join(MODELS)} (deq: implicit PIDEQ; "
               "unrolled: the same DEQ, autodiff through its iterations; mlp: explicit PINN of about the same size)")
        a("--epochs", type=nonneg_int, default=epochs, help="full-batch Adam steps (cosine schedule to lr/50)")
        a("--collocation", type=positive_int, default=n, help="interior collocation points per step")
        a("--boundary-points", type=positive_int, default=d.boundary_points,
          help="points per boundary/periodic condition per step (kdv: twice as many initial points)")
        a("--lr", type=positive_float, default=lr, help="initial Adam learning rate")
        a("--condition-weight", type=positive_float, default=d.condition_weight,
          help="weight of the boundary/initial/periodic terms (the interior residual has weight 1)")
        a("--width", type=positive_int, default=d.width, help="DEQ hidden states (the MLP matches its parameter count)")
        a("--mlp-depth", type=positive_int, default=d.mlp_depth, help="hidden layers of the MLP baseline")
        a("--tol", type=positive_float, default=d.tol, help="forward solver tolerance (relative residual)")
        a("--max-iter", type=positive_int, default=d.max_iter, help="forward solver iteration limit")
        a("--solver", default=d.solver, help="forward solver of the implicit DEQ")
        a("--sampler", choices=SAMPLERS, default=d.sampler,
          help="collocation: fresh uniform points each step, one fixed set, or residual-based resampling (RAD)")
        a("--rad-every", type=positive_int, default=d.rad_every, help="rad: resample every this many steps")
        if name == "kdv":
            a("--delta2", type=positive_float, default=d.delta2, help="dispersion coefficient δ²")
            a("--T", dest="T", type=positive_float, default=d.T, help="time horizon")
        a("--seed", type=seed, default=d.seed)
        a("--dtype", choices=("float32", "float64"), default=d.dtype)
        a("--device", default=d.device, help="cpu or cuda")
        a("--threads", type=nonneg_int, default=1, help="torch CPU threads (0: torch's default)")
        a("--resume", action="store_true", help="continue each model from OUT/checkpoint_<model>.pt (bit-identical)")
        a("--checkpoint-every", type=nonneg_int, default=250,
          help="write OUT/checkpoint_<model>.pt every this many epochs (0: at the end only)")
        a("--no-progress", action="store_true", help="no progress bar")
        q.set_defaults(func=_run_interface_problem, problem=name)


def _run_interface_problem(args: argparse.Namespace) -> int:
    import torch

    from ..physics.pde_jobs import JobConfig, run_job

    fields = ("models", "epochs", "collocation", "boundary_points", "condition_weight", "lr", "width", "mlp_depth", "tol", "max_iter",
              "solver", "sampler", "rad_every", "delta2", "T", "seed", "dtype", "device")
    try:
        cfg = JobConfig(problem=args.problem, **{k: getattr(args, k) for k in fields if hasattr(args, k)})
    except ValueError as err:  # messages start with the setting's name
        field, _, rest = str(err).partition(": ")
        raise UsageError(f"--{field.replace('_', '-')}: {rest}" if field in fields else one_line(err)) from err
    check_device(cfg.device)
    check_solver(cfg.solver)
    out = out_dir(args.out)
    if args.resume and not any((out / f"checkpoint_{m}.pt").is_file() for m in cfg.models):
        raise UsageError(f"--resume: no checkpoint_<model>.pt in {out}")
    if args.threads:
        torch.set_num_threads(args.threads)
    with user_errors(kinds=(FloatingPointError, OSError, ValueError)):
        res = run_job(cfg, out, progress=not args.no_progress, resume=args.resume,
                      checkpoint_every=args.checkpoint_every)
    print(f"\n{cfg.problem}: relative L2 vs {res['reference']} (target ≤ {res['target_rel_l2']:g})")
    for kind, m in res["models"].items():
        print(f"  {kind:9s} {m['rel_l2']:.3e} ({'met' if m['target_met'] else 'not met'}), {m['parameters']} parameters, "
              f"{1e3 * m['epoch_time_median_s']:.1f} ms/epoch, graph {m['graph_memory_mb']:.1f} MiB")
    print(f"  results: {out / 'results.json'}")
    return 0


def _unavailable(name: str, err: Exception) -> int:
    print(f"deqdiff pinn {name}: unavailable ({type(err).__name__}: {err})", file=sys.stderr)
    return 2


def _flagged(err: ValueError, flags: set[str]) -> UsageError:
    field = str(err).split(" ", 1)[0].rstrip(",:")  # validate()'s messages start with the setting's name
    msg = one_line(err)
    return UsageError(f"--{field.replace('_', '-')}: {msg}" if field in flags else msg)


def _run_vdp(args: argparse.Namespace) -> int:
    import torch

    from ..physics.vdp import VdPConfig, resume_state, run

    overrides = dict(model=args.model, width=args.width, batch=args.batch, epochs=args.epochs, lr=args.lr,
                     lr_final=args.lr_final, lbfgs_steps=args.lbfgs_steps, mu=args.mu, horizon=args.horizon,
                     t_end=args.t_end, rollout_t_end=args.rollout_t_end, n_test=args.n_test,
                     physics_weight=args.physics_weight, jacobian_weight=args.jacobian_weight, tol=args.tol,
                     solver=args.solver, dtype=args.dtype, seed=args.seed, device=args.device,
                     taylor=args.taylor, spectral_norm=args.spectral_norm,
                     mu_range=tuple(args.mu_range) if args.mu_range is not None else None)
    try:
        cfg = VdPConfig.for_setup(args.setup, **overrides)
    except ValueError as err:
        raise _flagged(err, set(overrides)) from err
    check_device(cfg.device)
    check_solver(cfg.solver)
    out = out_dir(args.out)
    state = None
    if args.resume:
        path = resume_checkpoint(out, args.resume)
        with user_errors():  # its messages name the flag
            state = resume_state(cfg, path)
    if args.threads:
        torch.set_num_threads(args.threads)
    with user_errors(kinds=(FloatingPointError, OSError)):  # a diverged loss names the flags to change
        res = run(cfg, out, resume=state if state is not None else False, progress=not args.no_progress,
                  plots=not args.no_plots, checkpoint_every=args.checkpoint_every)
    _summary(cfg, res)
    return 0


def _run_pde(args: argparse.Namespace) -> int:
    from ..physics import burgers

    with user_errors():
        cfg, state = burgers.prepare(args)  # flags, --resume and its checkpoint
    check_device(cfg.device)
    check_solver(cfg.solver)
    out_dir(args.out)
    with user_errors(kinds=(FloatingPointError, OSError)):
        return burgers.execute(cfg, args, state)


def _summary(cfg, res: dict) -> None:
    if cfg.mu_range is not None:
        return _family_summary(cfg, res)
    m, tr = res["metrics"], res["training"]
    print(f"\nVan der Pol (μ = {cfg.mu:g}), setup '{cfg.setup}', model '{cfg.model}' "
          f"({res['parameters']} parameters), {tr['epochs']} epochs in {tr['train_time_s']:.1f} s "
          f"({1e3 * (tr['epoch_time_mean_s'] or math.nan):.1f} ms/epoch)")
    if "solver_iters_mean" in tr:
        print(f"  forward solver iterations: mean {tr['solver_iters_mean']:.1f}, max {tr['solver_iters_max']:.0f}")
    if cfg.setup == "pideq":
        print(f"  vs solve_ivp on t ∈ [0, {cfg.t_end:g}]: relative L2 {m['rel_l2']:.2e}, IAE {m['iae']:.2e}")
    else:
        print(f"  held-out initial states ({cfg.n_test}), Δ ∈ [0, {cfg.horizon:g}]: relative L2 "
              f"{m['held_out_rel_l2']:.2e} (of the increment y − y0: {m['held_out_increment_rel_l2']:.2e})")
        if "held_out_remainder_rel_l2" in m:
            print(f"  of the part beyond the order-{cfg.taylor} Taylor skip: {m['held_out_remainder_rel_l2']:.2e}; "
                  f"skip alone: held-out {m['skip_only_held_out_rel_l2']:.2e}, rollout {m['skip_only_rollout_rel_l2']:.2e}")
        print(f"  rollout t ∈ [0, {cfg.rollout_t_end:g}] from y0 = {tuple(cfg.y0)}: relative L2 "
              f"{m['rollout_rel_l2']:.2e}, IAE {m['rollout_iae']:.2e}, max |error| {m['rollout_max_abs_error']:.2e}")
    for k, v in res["files"].items():
        print(f"  {k}: {v}")


def _family_summary(cfg, res: dict) -> None:
    tr = res["training"]
    lo, hi = cfg.mu_range
    print(f"\nVan der Pol family μ ∈ [{lo:g}, {hi:g}], model '{cfg.model}' ({res['parameters']} parameters), "
          f"{tr['epochs']} epochs in {tr['train_time_s']:.1f} s ({1e3 * (tr['epoch_time_mean_s'] or math.nan):.1f} ms/epoch)")
    if "solver_iters_mean" in tr:
        print(f"  forward solver iterations: mean {tr['solver_iters_mean']:.1f}, max {tr['solver_iters_max']:.0f}")
    print(f"  relative L2 vs solve_ivp: held-out flows ({cfg.n_test} y0 × 21 Δ ∈ [0, {cfg.horizon:g}]), "
          f"rollout from y0 = {tuple(cfg.y0)} to t = {cfg.rollout_t_end:g}")
    skip = "skip_only_held_out_rel_l2" in res["per_mu"][0]
    print(f"  {'μ':>7s}  {'regime':13s} {'held-out':>9s} {'rollout':>9s}" + ("   skip alone: held-out  rollout" if skip else ""))
    for r in res["per_mu"]:
        line = f"  {r['mu']:7.4g}  {r['regime']:13s} {r['held_out_rel_l2']:9.2e} {r['rollout_rel_l2']:9.2e}"
        if skip:
            line += f"               {r['skip_only_held_out_rel_l2']:9.2e} {r['skip_only_rollout_rel_l2']:8.2e}"
        print(line)
    for k, v in res["files"].items():
        print(f"  {k}: {v}")
