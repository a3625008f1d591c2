"""``deqdiff operator <problem>``: steady-state neural operators, a DEQ vs the explicit network.

* ``deqdiff operator darcy`` — generates 2-D Darcy-flow data (thresholded Gaussian random
  coefficient fields, finite-difference solutions; :mod:`deqdiff.physics.darcy`), trains the
  FNO-DEQ (Marwah et al. 2023) and the explicit FNO with the same parameters
  (:mod:`deqdiff.models.fno`), and writes the held-out relative L2 error, the error under noisy
  inputs, time per epoch, solver iterations and memory to ``OUT/results.json`` with PNG figures
  (:mod:`deqdiff.physics.neural_operator`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import (add_run_flags, check_device, check_solver, flagged, float_list, nonneg_float, out_dir,
                      positive_float, positive_int, resume_checkpoint, set_threads, str_list, user_errors)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("operator", help="steady-state neural operators: FNO-DEQ vs explicit FNO (Darcy flow)",
                       description="Train a DEQ neural operator and its explicit counterpart on generated PDE data.")
    problems = p.add_subparsers(dest="problem", required=True, metavar="PROBLEM")
    _register_darcy(problems)


def _register_darcy(problems) -> None:
    from ..physics.neural_operator import OperatorConfig  # light: no training at import

    d = OperatorConfig()
    q = problems.add_parser(
        "darcy", help="2-D Darcy flow -∇·(a∇u) = 1: coefficient field a ↦ solution u",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Generate Darcy-flow data (seeded, offline), train the FNO-DEQ and the explicit FNO with equal "
                    "parameters, report held-out relative L2 error and robustness to noisy coefficient fields.")
    a = q.add_argument
    a("--out", default="runs/operator_darcy", help="output folder (results.json, figures, checkpoint.pt)")
    a("--n-train", type=positive_int, default=d.n_train, help="training fields")
    a("--n-test", type=positive_int, default=d.n_test, help="held-out fields")
    a("--resolution", type=positive_int, default=d.resolution, help="grid nodes per side, boundary included")
    a("--width", type=positive_int, default=d.width, help="channels of the Fourier layers")
    a("--modes", type=positive_int, default=d.modes, help="Fourier modes kept per dimension")
    a("--projection", type=positive_int, default=d.projection, help="hidden channels of the projection")
    a("--k", type=positive_int, default=d.k, help="explicit FNO: cell applications")
    a("--explicit", choices=("tied", "untied"), default=d.explicit,
      help="explicit FNO: one shared cell (the DEQ's parameters) or k independent cells")
    a("--epochs", type=positive_int, default=d.epochs)
    a("--batch", type=positive_int, default=d.batch, help="fields per training batch")
    a("--lr", type=positive_float, default=d.lr, help="initial Adam learning rate (cosine-annealed to 0)")
    a("--weight-decay", type=nonneg_float, default=d.weight_decay)
    a("--solver", default=d.solver, help="DEQ forward solver (anderson, broyden, fixed_point, …)")
    a("--tol", type=positive_float, default=d.tol, help="DEQ forward tolerance (relative residual)")
    a("--max-iter", type=positive_int, default=d.max_iter, help="DEQ forward iterations at most")
    a("--noise", type=float_list(nonneg_float), default=d.noise,
      help="relative noise sizes ε (comma-separated): inputs a + ε·rms(a)·N(0,1)")
    a("--models", type=str_list, default=d.models, help="models to train, comma-separated: deq, explicit")
    add_run_flags(a, {"seed": d.seed, "dtype": d.dtype, "device": d.device}, seed="data, initialization and batch order",
                  dtype=None, device="cpu, cuda, cuda:1 …")
    a("--cache", action="store_true", help="keep the generated data in OUT/darcy_data.npz and reuse it")
    a("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
      help="continue bit-identically from CHECKPOINT (default: OUT/checkpoint.pt)")
    # --threads: the spectral layers are small; more intra-op threads mostly spend CPU on synchronization
    add_run_flags(a, {"checkpoint_every": 1},
                  checkpoint_every="write OUT/checkpoint.pt every this many epochs (0: at the end of each model only)",
                  threads=None, no_progress=None)
    a("--no-plots", action="store_true", help="skip the PNG figures")
    q.set_defaults(func=_run_darcy)


def config_from_args(args: argparse.Namespace):
    """The validated config of the parsed flags; ``UsageError`` naming the flag otherwise."""
    from ..physics.neural_operator import OperatorConfig, config_fields, flag

    values = {k: getattr(args, k) for k in config_fields() if hasattr(args, k)}
    try:
        return OperatorConfig(**values).validate()
    except ValueError as err:
        raise flagged(err, values, flag) from err


def _run_darcy(args: argparse.Namespace) -> int:
    from ..physics.neural_operator import resume_state, run

    cfg = config_from_args(args)
    check_device(cfg.device)
    check_solver(cfg.solver)
    out = out_dir(args.out)
    state = None
    if args.resume:
        path = resume_checkpoint(out, args.resume)
        with user_errors():  # its messages name the flag
            state = resume_state(cfg, path)
    if args.cache and (out / "darcy_data.npz").exists():
        from ..physics.darcy import load_or_generate

        with user_errors("--cache"):  # an unreadable cache file is named before training
            load_or_generate(out / "darcy_data.npz", cfg.data_settings())
    set_threads(args.threads)
    with user_errors(kinds=(FloatingPointError,)):  # a diverged loss names the flag to change
        res = run(cfg, out, state=state, progress=not args.no_progress, plots=not args.no_plots, cache=args.cache,
                  checkpoint_every=args.checkpoint_every)
    _summary(res, out)
    return 0


def _summary(res: dict, out: Path) -> None:
    print(f"\nDarcy flow, {res['data']['grid']}, {res['data']['n_train']} training / {res['data']['n_test']} held-out fields")
    for name, m in res["models"].items():
        ev = m["held_out"]
        line = (f"  {name:8s} ({m['kind']}, {m['parameters']} parameters): held-out relative L2 {ev['rel_l2']:.3e} "
                f"(target ≤ 5e-2: {'met' if ev['rel_l2'] <= 5e-2 else 'not met'}), "
                f"{m['epoch_time_s_median']:.2f} s/epoch, {m['saved_activations_mib_per_batch']:.1f} MiB activations/batch")
        print(line)
        if ev["forward_iters_mean"] is not None:
            print(f"           forward iterations: mean {ev['forward_iters_mean']:.1f}, max {ev['forward_iters_max']:.0f}; "
                  f"unconverged rows {ev['unconverged_forward_rows']} (worst relative residual {ev['worst_forward_rel_residual']:.2e})")
        print("           with noise: " + ", ".join(f"ε={r['noise']:g}: {r['rel_l2']:.3e}" for r in m["noise"]))
    print(f"  peak memory (process): {res['peak_rss_mib']:.0f} MiB; results: {out / 'results.json'}")
