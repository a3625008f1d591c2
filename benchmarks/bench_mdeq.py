"""The multiscale DEQ (Bai, Koltun & Kolter 2020) on scikit-learn digits: training and its loss
landscape (Nguyen 2022, §4.2.2).

Run from the repository root::

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_mdeq.py               # full run
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_mdeq.py --quick       # smoke run

One command does both parts: ``deqdiff analyze landscape --model mdeq`` trains the digits MDEQ
exactly as ``deqdiff train --model mdeq`` does (same defaults and seed; the analysis trains in
cached stages, which equal one uninterrupted run bit for bit), then evaluates the
filter-normalized 1-D and 2-D landscapes on the held-out digits. This script reads the run's
``metrics.json`` (per-epoch test accuracy, forward/backward solve iterations, time per epoch)
and ``landscape.json`` (flatness numbers), and writes ``benchmarks/results/mdeq[_quick].json``;
the figures are copied to ``docs/figures/mdeq_landscape_*.png`` (full run only).

Target: test accuracy ≥ 97 % after the default 15 epochs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import time
from pathlib import Path

import harness

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/out/mdeq", help="work folder (cached model, figures, landscape.json)")
    p.add_argument("--steps", type=int, default=None, help="grid points per axis (default 51; quick 5)")
    p.add_argument("--points-per-batch", type=int, default=16, help="grid points per vmapped solve")
    p.add_argument("--quick", action="store_true", help="1 epoch, 5x5 grid, 64 images")
    args = p.parse_args()

    from deqdiff.cli import main as cli

    out = Path(args.out + ("_quick" if args.quick else ""))
    steps = args.steps or (5 if args.quick else 51)
    cmd = ["analyze", "landscape", "--model", "mdeq", "--out", str(out), "--steps", str(steps),
           "--points-per-batch", str(args.points_per_batch), "--no-progress"]
    if args.quick:
        cmd += ["--epochs", "1", "--samples", "64"]
    t0 = time.perf_counter()
    rc = cli(cmd)
    if rc:
        raise SystemExit(f"deqdiff {' '.join(cmd)} failed with exit code {rc}")
    total = time.perf_counter() - t0

    metrics = json.loads((out / "models" / "mdeq" / "run" / "metrics.json").read_text())
    land = json.loads((out / "landscape.json").read_text())
    epochs = metrics["epochs"]
    final = epochs[-1]
    per_epoch = [{"epoch": e["epoch"], "test_acc": e["test"]["acc"], "train_acc": e["train"]["acc"],
                  "test_fwd_iter_mean": e["test"].get("fwd_iter_mean"), "test_fwd_iter_max": e["test"].get("fwd_iter_max"),
                  "train_bwd_iter_mean": e["train"].get("bwd_iter_mean"), "time_s": e["time_s"]} for e in epochs]
    summary = land["summary"]["mdeq"]
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "deqdiff " + " ".join(cmd),
        "machine": harness.machine_info("platform", "torch", "threads", load_average_at_end="load_average"),
        "config": metrics["config"], "parameters": metrics["parameters"],
        "training": {
            "final_test_acc": final["test"]["acc"], "final_train_acc": final["train"]["acc"],
            "target_test_acc": 0.97, "target_met": final["test"]["acc"] >= 0.97,
            "test_fwd_iter_mean": final["test"].get("fwd_iter_mean"), "test_fwd_iter_max": final["test"].get("fwd_iter_max"),
            "test_fwd_converged": final["test"].get("fwd_converged"), "test_fwd_res_max": final["test"].get("fwd_res_max"),
            "train_fwd_iter_mean": final["train"].get("fwd_iter_mean"),
            "train_bwd_iter_mean": final["train"].get("bwd_iter_mean"),
            "train_bwd_iter_max": final["train"].get("bwd_iter_max"),
            "time_per_epoch_s_median": sorted(e["time_s"] for e in epochs)[len(epochs) // 2],
            "per_epoch": per_epoch,
        },
        "landscape": {
            "split": land["split"], "samples": land["samples"], "grid": land["grid"], "span": land["span"],
            "ignore": land["ignore"], "flatness_2d": summary["flatness"], "seconds_2d": summary["seconds_2d"],
            "convergence_warnings_2d": summary["convergence_warnings"],
            "flatness_1d": land["landscapes_1d"]["mdeq"]["flatness"] if land["landscapes_1d"] else None,
        },
        "wall_s_total": total,
    }
    res = harness.write_json(ROOT / "benchmarks" / "results" / ("mdeq_quick.json" if args.quick else "mdeq.json"), result)
    if not args.quick:
        for name in ("contour", "surface", "1d"):
            src = out / f"landscape_{name}.png"
            if src.is_file():
                shutil.copy(src, ROOT / "docs" / "figures" / f"mdeq_landscape_{name}.png")
    t = result["training"]
    f = result["landscape"]["flatness_2d"]
    print(f"test acc {t['final_test_acc']:.4f} (target 0.97: {'met' if t['target_met'] else 'NOT met'}); "
          f"fwd iters {t['test_fwd_iter_mean']:.1f}/{t['test_fwd_iter_max']}; bwd iters {t['train_bwd_iter_mean']:.1f}; "
          f"{t['time_per_epoch_s_median']:.0f} s/epoch; landscape L* {f['center_loss']:.4f}, "
          f"area(<= L*+0.1) {f['area_below']['0.1']:.3f}; wrote {res}")


if __name__ == "__main__":
    main()
