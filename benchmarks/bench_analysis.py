"""Timings of the analysis toolkit: the default ``deqdiff analyze landscape`` run and
the empirical NTK of 500 samples.

    python benchmarks/bench_analysis.py [--out analysis_out] [--quick]

* landscape: the default command (conv DEQ and repeat-6/11/18, 51×51 grid on [−1, 1]², 64
  training images, vmapped grid batches), timed end to end, with the models already trained and
  cached in ``--out/models`` (training time reported separately by the first, cold run);
* NTK: the full (S·C)×(S·C) kernel of the monotone DEQ (digits, width 64, 10 classes) for
  S = 500 training images — per-sample Jacobians by implicit adjoint solves, then J Jᵀ.

Writes ``benchmarks/results/analysis[_quick].json`` and prints a Markdown table for
``benchmarks/RESULTS.md`` (analysis section).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import harness

ROOT = Path(__file__).resolve().parent


def run_cli(argv: list[str]) -> float:
    """Wall seconds of ``deqdiff ARGV`` in a fresh process (its output goes to the terminal)."""
    return harness.run_cli(argv, capture=False).wall_s


def ntk_timing(samples: int, out: str, width: int = 64) -> dict:
    from deqdiff.analysis.ntk import empirical_ntk, ntk_summary, per_sample_jacobian
    from deqdiff.analysis.runs import digits_split, trained_snapshots

    model = trained_snapshots("mon", [0], Path(out) / "models", width=width, batch_size=64, log=lambda *_: None)[0]
    X, _ = digits_split("digits", split="train", limit=samples)
    t = time.perf_counter()
    J = per_sample_jacobian(model, X, solver="anderson", tol=1e-6, max_iter=300)
    tj = time.perf_counter() - t
    K = empirical_ntk(model, X, jacobians=(J, J))
    s = ntk_summary(K)
    total = time.perf_counter() - t
    return {"samples": samples, "kernel_size": s["size"], "parameters": int(J.shape[-1]), "jacobian_s": tj,
            "total_s": total, "lambda_min": s["lambda_min"], "lambda_max": s["lambda_max"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="analysis_out")
    p.add_argument("--quick", action="store_true", help="11×11 grid, NTK of 100 samples")
    args = p.parse_args()
    steps, ntk_n = (11, 100) if args.quick else (51, 500)
    common = ["--out", args.out, "--no-progress"]
    cold = run_cli(["analyze", "landscape", *common, "--steps", "3", "--no-1d"])  # trains + caches the models
    warm = run_cli(["analyze", "landscape", *common, "--steps", str(steps)])
    land = json.loads((Path(args.out) / "landscape.json").read_text())
    res = {
        "command": f"deqdiff analyze landscape --out {args.out}" + ("" if steps == 51 else f" --steps {steps}"),
        "landscape": {"grid": steps, "models": land["models"], "samples": land["samples"], "total_s": warm,
                      "per_model_2d_s": {k: v["seconds_2d"] for k, v in land["summary"].items()},
                      "first_run_with_training_s": cold},
        "ntk": ntk_timing(ntk_n, args.out),
        "machine": harness.machine_info("python", "torch", "cpus", "threads", omp="omp_num_threads"),
    }
    path = harness.write_json(ROOT / "results" / ("analysis_quick.json" if args.quick else "analysis.json"), res)
    L, N = res["landscape"], res["ntk"]
    print(harness.markdown_table(["run", "size", "time"], [
        [f"`{res['command']}` (models cached)", f"{len(L['models'])} models × {steps}×{steps} grid, "
         f"{L['samples']} images", f"{L['total_s']:.0f} s"],
        ["NTK, monotone DEQ (width 64)", f"{N['samples']} samples, kernel {N['kernel_size']}², "
         f"{N['parameters']} parameters", f"{N['total_s']:.1f} s (Jacobians {N['jacobian_s']:.1f} s)"]]))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
