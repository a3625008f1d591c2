"""Benchmark of the PDE interface (deqdiff.physics.pde): each problem's relative L2 error vs its
reference for the implicit PIDEQ and, in the same run, the unrolled PIDEQ and an MLP PINN of
about the same size (median epoch time, training time, graph memory of a step); Burgers and heat
re-expressed in the interface vs the figures of ``deqdiff pinn burgers|heat``.

Run as a script (one problem per process keeps runs independent and lets them run in parallel):

    OMP_NUM_THREADS=1 python benchmarks/bench_pde.py --problems poisson2d
    OMP_NUM_THREADS=1 python benchmarks/bench_pde.py --problems kdv
    OMP_NUM_THREADS=1 python benchmarks/bench_pde.py --problems burgers,heat

Each problem's figures land in ``--runs/<problem>``; its entry is merged into
``benchmarks/results/pde.json`` (existing entries of other problems are kept).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import harness
from deqdiff.physics.pde_jobs import JobConfig, run_job
from deqdiff.physics.pde_runner import epoch_time, evaluate_pde, train_pde

RESULTS = Path(__file__).parent / "results" / "pde.json"
#: today's figures of `deqdiff pinn burgers|heat` (benchmarks/results/pinn_{burgers,heat}.json)
TODAY = {"burgers": "pinn_burgers.json", "heat": "pinn_heat.json"}


def run_interface_classic(name: str, epochs: int, out: Path) -> dict:
    """Burgers or heat written in the interface, trained like `deqdiff pinn burgers` (24 states,
    1500 Adam epochs from lr 1e-2 with cosine to lr/50, 1000 + 200 + 200 points, float32)."""
    from deqdiff.physics.coordinate_models import CoordinatePIDEQ
    from deqdiff.physics.pde_examples import burgers_problem, heat_problem

    torch.manual_seed(0)
    problem = burgers_problem() if name == "burgers" else heat_problem()
    model = CoordinatePIDEQ(list(problem.domain.bounds.values()), 1, 24, tol=1e-5, max_iter=100).float()
    t0 = time.perf_counter()
    trainer = train_pde(problem, model, epochs=epochs, lr=1e-2, seed=0)
    wall = time.perf_counter() - t0
    ev = evaluate_pde(problem, model, (201, 101))
    today = json.loads((RESULTS.parent / TODAY[name]).read_text())
    return {"interface": {"rel_l2": ev["rel_l2"], "max_abs_error": ev["max_abs"], "train_wall_s": wall,
                          "epoch_time_median_s": epoch_time(trainer.history), "epochs": epochs,
                          "parameters": sum(p.numel() for p in model.parameters())},
            "today_deqdiff_pinn": {k: today[k] for k in ("rel_l2", "max_abs_error", "s_per_epoch", "parameters")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--problems", default="poisson2d,kdv", help="comma-separated: poisson2d, kdv, burgers, heat")
    ap.add_argument("--models", default="deq,unrolled,mlp")
    ap.add_argument("--epochs", type=int, default=None, help="default: the CLI's per problem (1500 burgers/heat)")
    ap.add_argument("--runs", default="runs/bench_pde", help="folder for each run's figures and results")
    ap.add_argument("--kdv-T", type=float, default=None, help="KdV horizon (default: the CLI's)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.is_file() else {}
    for name in [p.strip() for p in args.problems.split(",") if p.strip()]:
        folder = Path(args.runs) / name
        started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        load = os.getloadavg()[0]
        folder.mkdir(parents=True, exist_ok=True)
        if name in TODAY:
            entry = run_interface_classic(name, args.epochs or 1500, folder)
        else:
            extra = {"T": args.kdv_T} if name == "kdv" and args.kdv_T else {}
            cfg = JobConfig(problem=name, models=tuple(args.models.split(",")), epochs=args.epochs, **extra)
            folder = folder / "+".join(cfg.models)
            folder.mkdir(parents=True, exist_ok=True)
            entry = run_job(cfg, folder, progress=False)
        entry["meta"] = {"started": started, "load_average_at_start": load, **harness.machine_info("torch", "python"),
                         "threads": 1,
                         "command": f"OMP_NUM_THREADS=1 python benchmarks/bench_pde.py --problems {name} "
                                    f"--models {args.models}" + (f" --kdv-T {args.kdv_T}" if extra_T(args, name) else "")}
        data = json.loads(out.read_text()) if out.is_file() else {}  # other processes may have written meanwhile
        data[name if name in TODAY else f"{name}:{args.models}"] = entry
        harness.write_json(out, data)
        print(json.dumps({name: {k: v for k, v in entry.items() if k in ("models", "interface")}}, indent=1, default=str)[:3000])


def extra_T(args, name: str) -> bool:
    return name == "kdv" and args.kdv_T is not None


if __name__ == "__main__":
    main()
