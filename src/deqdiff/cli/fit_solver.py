"""``deqdiff fit-solver --from RUN_DIR``: fit a neural DEQ solver (Bai, Koltun & Kolter 2022) to a
trained run and compare it with Anderson, Broyden and plain iteration on held-out inputs.

Reads a run written by ``deqdiff train`` (conv, monotone and other DEQ classifiers),
``deqdiff pinn vdp`` (the physics-informed DEQ), ``deqdiff pinn poisson2d|kdv`` (the implicit
PIDEQ of a PDE, ``checkpoint_deq.pt``) or ``deqdiff inverse`` (the reconstruction DEQ); writes the fitted solver next to the model
(``RUN_DIR/neural_solver.pt``), and ``fit_solver.json`` and ``fit_solver.png`` (residual and
downstream metric vs f-evaluations) to ``--out``. The fitting time is reported as a share of the
run's own training time (wall clock, and CPU time where the run recorded it).

The default initializer is kernel ridge regression of the fixed points on the injections (one
linear solve on all fitting inputs; the ground truth of all but the first ``--warm-start`` of
them is solved from its own early fit); ``--initializer network`` fits the paper's kind of small
network by gradient steps instead. ``--steps`` > 0 also fits the HyperAnderson mixer through
unrolled solver steps (kept only where held-out inputs favour it).
"""

from __future__ import annotations

import argparse

from ._common import DefaultsHelp, UsageError, int_list, nonneg_int, out_dir, positive_float, positive_int, seed, user_errors


def _budget(text: str) -> int:
    v = positive_int(text)
    if v < 2:
        raise argparse.ArgumentTypeError(f"expected budgets of at least 2 f-evaluations, got {text!r}")
    return v


_budget.__name__ = "an integer ≥ 2"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fit-solver", help="fit a neural solver (learned initializer + Anderson mixing) to a trained DEQ",
                       description=__doc__, formatter_class=DefaultsHelp)
    a = p.add_argument
    a("--from", dest="run_dir", required=True, metavar="RUN_DIR",
      help="run directory of `deqdiff train`, `deqdiff pinn vdp` or `deqdiff inverse` (checkpoint.pt and its "
           "metrics), or of `deqdiff pinn poisson2d|kdv` (checkpoint_deq.pt)")
    a("--out", default=None, help="folder for fit_solver.json and fit_solver.png (default: RUN_DIR/fit_solver)")
    a("--fit-samples", type=positive_int, default=2048,
      help="training inputs drawn for the fit (at most the training split; with --steps > 0 a fifth of them is "
           "kept out to choose the mixer rule)")
    a("--initializer", choices=("kernel", "network"), default="kernel",
      help="kernel: kernel ridge regression of the fixed points on the injections (closed form); network: a small "
           "network fitted by gradient steps")
    a("--warm-start", type=nonneg_int, default=256,
      help="ground truth of this many inputs from the default start; the rest start from a kernel fit on them "
           "(0: all from the default start)")
    a("--no-reset", dest="reset", action="store_false",
      help="never restart samples from zero (by default a sample still running after the mean f-evaluations of a "
           "ground-truth solve from the default start restarts from zero with plain Anderson, when the longest "
           "such solve fits in the iterations left)")
    a("--learned-steps", type=nonneg_int, default=1,
      help="kernel initializer: learned residual-correction steps before the Anderson loop (each a ridge map from "
           "the residual to the error, fitted on the kernel's leave-one-out starts, kept while it beats a plain "
           "step; one f-evaluation each; ignored with --initializer network)")
    a("--init-steps", type=nonneg_int, default=600,
      help="network initializer: Adam steps fitting it alone to the fixed points first (no f-evaluations)")
    a("--init-batch", type=positive_int, default=64, help="samples per initializer-only step")
    a("--steps", type=nonneg_int, default=0,
      help="fitting steps (Adam) of the HyperAnderson mixer through the unrolled solver (0: plain Anderson steps "
           "from the initializer's start)")
    a("--batch", type=positive_int, default=32, help="samples per fitting step")
    a("--unroll", type=positive_int, default=6, help="solver steps unrolled per fitting step")
    a("--lr", type=positive_float, default=3e-3, help="Adam learning rate (cosine-annealed)")
    a("--m", type=positive_int, default=5, help="Anderson memory of the neural solver")
    a("--hidden", type=positive_int, default=64, help="width of the HyperAnderson network")
    a("--init-hidden", type=positive_int, default=None,
      help="network initializer: width of its random-feature layer (vector states; default 1024) or its channels "
           "(image states; default 32)")
    a("--init-rank", type=nonneg_int, default=32,
      help="network initializer on images: rank of its global linear correction (0: none)")
    a("--gt-tol", type=positive_float, default=None,
      help="relative residual of the ground-truth fixed points (default: the model's tolerance)")
    a("--budget-share", type=positive_float, default=None,
      help="stop the fit's gradient steps once its time reaches this share of the run's training time (e.g. "
           "0.05): CPU time where the run recorded it, else wall time; None: no limit")
    a("--budgets", type=int_list(_budget), default=[2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32],
      help="f-evaluation budgets of the residual/metric comparison (comma-separated)")
    a("--seed", type=seed, default=0, help="seeds the fitting inputs and the networks")
    a("--threads", type=nonneg_int, default=1, help="torch CPU threads (0: torch's default)")
    a("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import json
    import time
    from pathlib import Path

    import torch

    from ..solvers.neural import NeuralSolverConfig
    from ..solvers.neural_fit import FitConfig
    from ..training.fit_solver import (compare_solvers, default_gt_tol, fit_budget, fit_run, load_run,
                                       plot_comparison, summary)

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"--from {run_dir}: no such run directory")
    out = out_dir(args.out if args.out is not None else run_dir / "fit_solver")
    if args.threads:
        torch.set_num_threads(args.threads)
    with user_errors("--from", kinds=(ValueError, TypeError, OSError, KeyError, ImportError)):
        run = load_run(run_dir, fit_samples=args.fit_samples, seed=args.seed)
    with user_errors():
        budget, clock = None, "wall"
        if args.budget_share is not None:
            if not (run.training_cpu_time_s or run.training_time_s > 0):
                raise ValueError(f"--budget-share: the run in {run_dir} records no training time")
            budget, clock = fit_budget(run, args.budget_share)
        fit = FitConfig(steps=args.steps, batch=args.batch, unroll=args.unroll, lr=args.lr, seed=args.seed,
                        select_tol=run.tol, select_max_iter=run.max_iter,
                        init_steps=args.init_steps, init_batch=args.init_batch,
                        gt_tol=args.gt_tol if args.gt_tol is not None else default_gt_tol(run),
                        initializer=args.initializer, warm_start=args.warm_start, reset=args.reset,
                        time_budget_s=budget, budget_clock=clock,
                        learned_steps=args.learned_steps if args.initializer == "kernel" else 0)
        config = NeuralSolverConfig((1,), (1,), m=args.m, hidden=args.hidden, init_hidden=args.init_hidden,
                                    init_rank=args.init_rank, meta={"run": str(run_dir), "kind": run.kind})
    t0 = time.perf_counter()
    fitted = fit_run(run, config=config, fit=fit, progress=not args.no_progress)
    path = run_dir / "neural_solver.pt"
    try:
        fitted.solver.save(path, extra={"kind": run.kind, "fit": fit.__dict__, "fit_time_s": fitted.time_s})
    except OSError as err:
        raise UsageError(f"--from {run_dir}: cannot write the fitted solver there ({err})") from err
    results = compare_solvers(run, fitted.solver, args.budgets, progress=not args.no_progress)
    head = summary(run, fitted, results)
    report = {"summary": head, "run": str(run_dir), "solver_file": str(path), "fit": fit.__dict__,
              "fit_samples_used": fitted.samples, "fit_samples_left_out": fitted.left_out,
              "fit_history": fitted.history[:: max(1, len(fitted.history) // 50)], "solvers": results,
              "torch_threads": torch.get_num_threads(), "wall_time_s": time.perf_counter() - t0}
    with open(out / "fit_solver.json", "w") as fh:
        json.dump(report, fh, indent=1)
    plot_comparison(results, run, out / "fit_solver.png")
    cpu = (f", CPU {100 * head['fit_cpu_share']:.1f} % of its {head['training_cpu_time_s']:.0f} s"
           if head["fit_cpu_share"] is not None else "")
    print(f"{run.kind}: neural solver ({head['initializer']} initializer) fitted in {head['fit_time_s']:.1f} s wall, "
          f"{head['fit_cpu_time_s']:.1f} s CPU (wall {100 * head['fit_time_share']:.1f} % of the run's "
          f"{head['training_time_s']:.0f} s of training{cpu}; {head['init_steps_done']} initializer and "
          f"{head['steps_done']} unrolled steps)")
    print(f"  f-evaluations to tol {run.tol:g} on {run.test_inputs.shape[0]} held-out inputs: neural "
          f"{head['f_evals_neural']:.2f}, anderson {head['f_evals_anderson']:.2f} (ratio {head['f_evals_ratio']:.2f}); "
          f"{run.metric_name}: {head['metric_neural']:.4g} vs {head['metric_anderson']:.4g}")
    print(f"  the initializer costs {head['initializer_cost_f_evals']:.1f} f-evaluations of wall time; whole solve "
          f"{head['time_neural_s']:.3f} s vs {head['time_anderson_s']:.3f} s")
    print(f"  solver: {path}\n  results: {out / 'fit_solver.json'}, {out / 'fit_solver.png'}")
    return 0
