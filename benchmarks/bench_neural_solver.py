"""Neural DEQ solvers (Bai, Koltun & Kolter 2022) on trained runs: f-evaluations to the model's
tolerance on held-out inputs, neural vs Anderson (target ≤ 0.5× at equal downstream metric), and
fitting time as a share of the model's training time (target ≤ 5 %; CPU time where the run
records it, as ``deqdiff train``, ``deqdiff pinn vdp`` and ``deqdiff pinn poisson2d|kdv`` (per
step, in the checkpoint's history) do, and wall time).

Train the base models first with the CLI defaults, e.g.::

    deqdiff train --out /tmp/nsolver/conv
    deqdiff pinn vdp --out /tmp/nsolver/vdp
    deqdiff train --model mon --out /tmp/nsolver/mon
    deqdiff train --model mdeq --out /tmp/nsolver/mdeq
    deqdiff pinn poisson2d --models deq --out /tmp/nsolver/poisson2d
    deqdiff pinn kdv --models deq --out /tmp/nsolver/kdv

then::

    OMP_NUM_THREADS=1 python benchmarks/bench_neural_solver.py --ablation \\
        --run conv=/tmp/nsolver/conv --run vdp=/tmp/nsolver/vdp --run mon=/tmp/nsolver/mon

Per run, the fit settings are ``--fit-samples``, ``--steps`` … (one set for every run) unless a
run is given as ``name=DIR:key=value,key=value`` (e.g. ``conv=/tmp/c:initializer=network,steps=60``).
Writes ``benchmarks/results/neural_solver.json`` and ``neural_solver_<NAME>.png`` (residual and
downstream metric vs f-evaluations per solver).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch

import harness
from deqdiff.solvers.neural import NeuralSolverConfig
from deqdiff.solvers.neural_fit import FitConfig
from deqdiff.training.fit_solver import (compare_solvers, default_gt_tol, fit_budget, fit_run, load_run,
                                         plot_comparison, summary)

KEYS = {"fit_samples": int, "steps": int, "batch": int, "unroll": int, "lr": float, "m": int, "hidden": int,
        "init_hidden": int, "gt_tol": float, "init_steps": int, "init_batch": int, "init_rank": int,
        "budget_share": float, "initializer": str, "warm_start": int, "reset": lambda v: v.lower() in ("1", "true", "yes"),
        "learned_steps": int}


def _run_arg(text: str) -> tuple[str, str, dict]:
    name, _, rest = text.partition("=")
    path, _, opts = rest.partition(":")
    if not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=RUN_DIR[:key=value,...], got {text!r}")
    over = {}
    for item in filter(None, opts.split(",")):
        k, _, v = item.partition("=")
        if k not in KEYS:
            raise argparse.ArgumentTypeError(f"unknown setting {k!r}; choose from {sorted(KEYS)}")
        over[k] = KEYS[k](v)
    return name, path, over


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=_run_arg, action="append", required=True, help="NAME=RUN_DIR[:key=value,...]")
    p.add_argument("--fit-samples", type=int, default=2048)
    p.add_argument("--initializer", choices=("kernel", "network"), default="kernel")
    p.add_argument("--warm-start", type=int, default=256)
    p.add_argument("--no-reset", dest="reset", action="store_false",
                   help="never restart stuck samples from zero (FitConfig.reset=False)")
    p.add_argument("--learned-steps", type=int, default=1)
    p.add_argument("--steps", type=int, default=0)
    p.add_argument("--init-steps", type=int, default=600)
    p.add_argument("--init-batch", type=int, default=64)
    p.add_argument("--init-rank", type=int, default=32)
    p.add_argument("--budget-share", type=float, default=None,
                   help="stop each fit once its time reaches this share of the run's training time (CPU time where "
                        "the run records it)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--unroll", type=int, default=6)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--m", type=int, default=5)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--init-hidden", type=int, default=None)
    p.add_argument("--budgets", default="2,3,4,5,6,8,10,12,16,24,32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ablation", action="store_true",
                   help="also solve with the fitted initializer and plain Anderson steps (mixer zeroed), and "
                        "with the mixer acting on the fitted steps only and on every step")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "neural_solver.json"))
    args = p.parse_args()
    torch.set_num_threads(1)
    budgets = [int(b) for b in args.budgets.split(",")]
    base = {k: getattr(args, k) for k in KEYS if hasattr(args, k)}
    out = {"command": "OMP_NUM_THREADS=1 python " + shlex.join(sys.argv),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": harness.machine_info("platform", "cpus", "torch", "threads", load_before="load_average"),
           "runs": {}}
    for name, run_dir, over in args.run:
        s = {**base, **over}
        t0 = time.perf_counter()
        run = load_run(run_dir, fit_samples=s["fit_samples"], seed=args.seed)
        share = s.get("budget_share")
        budget, clock = fit_budget(run, share) if share else (None, "wall")
        fit = FitConfig(steps=s["steps"], batch=s["batch"], unroll=s["unroll"], lr=s["lr"], seed=args.seed,
                        select_tol=run.tol, select_max_iter=run.max_iter,
                        init_steps=s["init_steps"], init_batch=s["init_batch"],
                        gt_tol=s.get("gt_tol") or default_gt_tol(run), initializer=s["initializer"],
                        warm_start=s["warm_start"], reset=s["reset"], time_budget_s=budget, budget_clock=clock,
                        learned_steps=s["learned_steps"] if s["initializer"] == "kernel" else 0)
        config = NeuralSolverConfig((1,), (1,), m=s["m"], hidden=s["hidden"], init_hidden=s["init_hidden"],
                                    init_rank=s["init_rank"])
        load = os.getloadavg()
        fitted = fit_run(run, config=config, fit=fit, progress=True)
        results = compare_solvers(run, fitted.solver, budgets, progress=True)
        head = summary(run, fitted, results)
        if args.ablation and fitted.steps_done:  # the fitted initializer with plain Anderson steps (HyperAnderson zeroed)
            plain = copy.deepcopy(fitted.solver)
            with torch.no_grad():
                plain.mixer.net[-1].weight.zero_()
                plain.mixer.net[-1].bias.zero_()
            abl = compare_solvers(run, plain, budgets[:3])["neural"]
            head["f_evals_initializer_only"] = abl["at_tol"]["f_evals_mean"]
            head["metric_initializer_only"] = abl["at_tol"]["metric"]
            for rule, steps in (("fitted_steps", fit.unroll), ("every_step", None), ("none", 0)):  # the paper's: every step
                other = copy.deepcopy(fitted.solver)
                other.config.mixer_steps = steps
                abl = compare_solvers(run, other, budgets[:3])["neural"]
                head[f"f_evals_mixer_{rule}"] = abl["at_tol"]["f_evals_mean"]
                head[f"metric_mixer_{rule}"] = abl["at_tol"]["metric"]
                head[f"converged_mixer_{rule}"] = abl["at_tol"]["converged"]
        elif args.ablation:  # no mixer steps: the solve already is the initializer with plain Anderson steps
            head["f_evals_initializer_only"] = head["f_evals_neural"]
            head["metric_initializer_only"] = head["metric_neural"]
        out["runs"][name] = {"run_dir": run_dir, "settings": s, "fit": fit.__dict__, "load_during_fit": load,
                             "load_after": os.getloadavg(), "summary": head, "solvers": results,
                             "fit_samples_used": fitted.samples, "fit_samples_left_out": fitted.left_out,
                             "wall_s": time.perf_counter() - t0}
        print(json.dumps({name: head}, indent=1))
        harness.write_json(args.out, out)  # after each run: partial results survive (folder created)
        plot_comparison(results, run, Path(args.out).with_name(f"neural_solver_{name}.png"))
    out["machine"]["load_after"] = os.getloadavg()
    harness.write_json(args.out, out)


if __name__ == "__main__":
    main()
