"""Peak memory of the Van der Pol job (``deqdiff pinn vdp``) against the length of training.

Run from the repository root::

    PYTHONPATH=src python benchmarks/bench_memory.py             # all cases + the default CLI run (~5 min, 2 cores)
    PYTHONPATH=src python benchmarks/bench_memory.py --quick     # 40 vs 200 Adam, 3 vs 8 L-BFGS, no default run

What is measured: each case runs in a fresh subprocess (1 torch thread, as the CLI) that builds
the default conditioned VdP trainer (:func:`deqdiff.physics.vdp.build_trainer`) with ``--epochs``
Adam epochs and ``--lbfgs-steps`` L-BFGS steps and trains it to the end, without evaluation.
Reported per case: the RSS after the first training step (the warmed-up baseline: imports,
model, allocator and one step's working set), the peak RSS (``ru_maxrss`` of the subprocess, from
``os.wait4``), the peak above the baseline, and the RSS every few steps. Memory that does not
grow with training means: the peak after 500 Adam epochs within 15 % of the peak after 40 (same
for 20 vs 3 L-BFGS steps). The default run is ``deqdiff pinn vdp --no-progress`` in a fresh
folder (training, evaluation, plots, JSON), whose peak RSS is the figure users see.

A one-line machine-speed reference is measured in the same run: the median time of one
2000×128 tanh layer (``tanh(x Wᵀ + b)``, float32, 1 thread).

JSON goes to ``benchmarks/results/memory.json`` (``--quick``: ``memory_quick.json``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import tempfile
import time
from pathlib import Path

import harness

ROOT = Path(__file__).resolve().parents[1]
#: the children's environment: one thread, as the CLI
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
_rss_mib = harness.current_rss_mib


def child(epochs: int, lbfgs: int, every: int) -> dict:
    """One training run in this (fresh) process; returns RSS figures in MiB."""
    import torch

    from deqdiff.physics import vdp

    torch.set_num_threads(1)
    cfg = vdp.VdPConfig.for_setup("conditioned", epochs=epochs, lbfgs_steps=lbfgs)
    trainer = vdp.build_trainer(cfg)
    after_build = _rss_mib()
    t0 = time.perf_counter()
    trainer.step()
    baseline = _rss_mib()
    trace = [(1, round(baseline, 1))]
    while not trainer.done:
        trainer.step()
        if trainer.step_count % every == 0 or trainer.done:
            trace.append((trainer.step_count, round(_rss_mib(), 1)))
    return {"epochs": epochs, "lbfgs_steps": lbfgs, "rss_after_build_mib": round(after_build, 1),
            "baseline_mib": round(baseline, 1),
            "peak_self_mib": round(harness.peak_rss_mib(), 1),
            "train_s": round(time.perf_counter() - t0, 1), "rss_trace_mib": trace}


def measure_case(epochs: int, lbfgs: int, every: int) -> dict:
    """:func:`child` in a fresh process; its peak RSS is ``ru_maxrss`` from ``os.wait4``."""
    run = harness.call_isolated(child, epochs, lbfgs, every, env=ENV, cwd=ROOT)
    res = run.data
    res["peak_mib"] = round(run.peak_rss_mib, 1)
    res["peak_above_baseline_mib"] = round(res["peak_mib"] - res["baseline_mib"], 1)
    res["wall_s"] = round(run.wall_s, 1)
    return res


def measure_default() -> dict:
    """``deqdiff pinn vdp`` with its defaults (``ru_maxrss`` of that process, as ``/usr/bin/time -v``)."""
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = str(Path(tmp) / "vdp")
        run = harness.run_cli(["pinn", "vdp", "--no-progress", "--out", out_dir], env=ENV, cwd=ROOT)
        peak, wall = run.peak_rss_mib, run.wall_s
        results = json.loads((Path(out_dir) / "results.json").read_text())
    return {"command": "deqdiff pinn vdp", "peak_mib": round(peak, 1), "wall_s": round(wall, 1),
            "train_time_s": results["training"].get("train_time_s"),
            "held_out_rel_l2": results["metrics"].get("held_out_rel_l2"),
            "rollout_rel_l2": results["metrics"].get("rollout_rel_l2")}


def speed_reference() -> dict:
    import torch

    torch.set_num_threads(1)
    return {"what": "one 2000x128 tanh layer tanh(x W^T + b), float32, 1 thread, median of 200",
            "ms": round(harness.tanh_layer_ms(200, warmup=20), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="shorter cases, no default run")
    ap.add_argument("--adam", type=int, nargs=2, default=None, metavar=("SHORT", "LONG"),
                    help="Adam epochs of the two Adam-only runs (default 40 500; --quick 40 200)")
    ap.add_argument("--lbfgs", type=int, nargs=2, default=None, metavar=("SHORT", "LONG"),
                    help="L-BFGS steps of the two L-BFGS runs, after 5 Adam epochs (default 3 20; --quick 3 8)")
    ap.add_argument("--no-default", action="store_true", help="skip the default `deqdiff pinn vdp` run")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/memory[_quick].json)")
    args = ap.parse_args()
    adam = args.adam or ([40, 200] if args.quick else [40, 500])
    lbfgs = args.lbfgs or ([3, 8] if args.quick else [3, 20])
    speed = speed_reference()
    print(f"machine speed: {speed['ms']:.3f} ms per 2000x128 tanh layer", flush=True)
    cases = {}
    for name, (e, l, every) in {f"adam_{adam[0]}": (adam[0], 0, 10), f"adam_{adam[1]}": (adam[1], 0, 50),
                                f"lbfgs_{lbfgs[0]}": (5, lbfgs[0], 1), f"lbfgs_{lbfgs[1]}": (5, lbfgs[1], 2)}.items():
        r = cases[name] = measure_case(e, l, every)
        print(f"{name:>10}: baseline {r['baseline_mib']:.0f} MiB, peak {r['peak_mib']:.0f} MiB "
              f"(+{r['peak_above_baseline_mib']:.0f}), {r['train_s']:.0f} s", flush=True)
    ratios = {
        "adam": round(cases[f"adam_{adam[1]}"]["peak_mib"] / cases[f"adam_{adam[0]}"]["peak_mib"], 3),
        "lbfgs": round(cases[f"lbfgs_{lbfgs[1]}"]["peak_mib"] / cases[f"lbfgs_{lbfgs[0]}"]["peak_mib"], 3),
    }
    print(f"peak ratio long/short: Adam {ratios['adam']:.3f}, L-BFGS {ratios['lbfgs']:.3f} (target ≤ 1.15)")
    result = {"date": datetime.date.today().isoformat(), **harness.machine_info("python", "machine", "cpus", "torch"),
              "speed_reference": speed, "cases": cases, "peak_ratio_long_over_short": ratios}
    if not (args.quick or args.no_default):
        d = result["default_run"] = measure_default()
        print(f"default `deqdiff pinn vdp`: peak {d['peak_mib']:.0f} MiB, {d['wall_s']:.0f} s", flush=True)
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"memory{'_quick' if args.quick else ''}.json"
    harness.write_json(out, result, indent=2, newline=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
