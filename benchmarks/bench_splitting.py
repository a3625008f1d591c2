"""Splitting solvers vs. generic fixed-point solvers on the same monotone DEQ.

Run from the repository root::

    PYTHONPATH=src python benchmarks/bench_splitting.py            # full run (~5 min, 1 CPU thread)
    PYTHONPATH=src python benchmarks/bench_splitting.py --quick    # smoke run (< 1 min)

Problems (weights at initialization, ``torch.manual_seed(0)``; inputs: a batch of
scikit-learn digits, standardized): the fully connected ``MonotoneDEQ(64, width, 10, m)`` for
widths 100 and 400 (batch 128), the same with A, B scaled ×2 (``hard``: larger L = ‖I − W‖₂),
and the circular-convolution ``MonotoneConvDEQ(1, channels, 8, 10, m)`` (batch 64).

Solvers, all through ``model.equilibrium(x, solver=...)`` (i.e. ``deqdiff.fixed_point``) with the
same per-sample rule ‖f(z) − z‖ ≤ tol·‖f(z)‖: ``pr`` (Peaceman–Rachford, α = 1 and α = 0.5
and 2), ``fb`` (forward–backward, α = m/L²), ``anderson`` (m = 5), ``broyden``, ``fixed_point``
(plain iteration; not guaranteed to converge on a monotone DEQ). Reported per (problem, solver,
tol): the iterations of the batch (max over samples; the batch is done when every sample is),
the median per-sample iterations, converged fraction, and the median CPU time (process time,
1 thread: robust on a shared machine) and wall time of the solve
(``--repeats``; includes building the splitting structure, i.e. W, L and the resolvent).
Iteration cap: ``--max-iter`` for the fully connected problems, a quarter of it for the conv ones.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time
import warnings
from pathlib import Path

import torch

import harness
from deqdiff.models import MonotoneConvDEQ, MonotoneDEQ

ROOT = Path(__file__).resolve().parent


def digits_batch(n: int, dtype) -> torch.Tensor:
    from sklearn.datasets import load_digits

    X = torch.tensor(load_digits().data[:n], dtype=dtype) / 16.0
    return (X - X.mean()) / X.std()


def problems(quick: bool, dtype):
    x128, x64 = digits_batch(128, dtype), digits_batch(64, dtype)
    widths = (100,) if quick else (100, 400)
    for width in widths:
        for hard in (False, True):
            torch.manual_seed(0)
            model = MonotoneDEQ(64, width, 10, m=0.05).to(dtype)
            if hard:
                with torch.no_grad():
                    model.cell.A.weight.mul_(2.0)
                    model.cell.B.weight.mul_(2.0)
            yield f"fc{width}{'-hard' if hard else ''}", model, x128, 1.0
    for ch in ((8,) if quick else (16, 32)):
        torch.manual_seed(0)
        yield f"conv{ch}", MonotoneConvDEQ(1, ch, 8, 10, m=0.05).to(dtype), x64.reshape(-1, 1, 8, 8), 0.25


SOLVERS = [
    ("pr(α=1)", dict(solver="pr", alpha=1.0)),
    ("pr(α=0.5)", dict(solver="pr", alpha=0.5)),
    ("pr(α=2)", dict(solver="pr", alpha=2.0)),
    ("fb(α=m/L²)", dict(solver="fb", alpha=None)),
    ("anderson", dict(solver="anderson")),
    ("broyden", dict(solver="broyden")),
    ("fixed_point", dict(solver="fixed_point")),
]


def run_one(model, x, opts, tol, max_iter, repeats):
    times, cpu, info = [], [], None
    for r in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.equilibrium(x, tol=tol, max_iter=max_iter, on_fail="ignore", **opts)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        info = model.deq.last_info.forward
        if cpu[-1] > 3.0:  # slow runs are timed once
            break
    extra = {k: float(v) for k, v in info.extra.items() if isinstance(v, (int, float))}
    return dict(
        batch_iterations=info.max_iterations,
        median_iterations=float(info.iterations.double().median()),
        converged=float(info.converged.double().mean()),
        max_rel_residual=float(info.rel_residual.max()),
        time_s=statistics.median(times),
        cpu_s=statistics.median(cpu),
        repeats=len(times),
        extra=extra,
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tols", type=float, nargs="+", default=[1e-4, 1e-6])
    ap.add_argument("--max-iter", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    max_iter = 500 if args.quick else args.max_iter
    rows = []
    for name, model, x, iter_frac in problems(args.quick, dtype):
        L = (model.cell.op_norm())
        for tol in args.tols:
            for sname, opts in SOLVERS:
                cap = max(100, int(iter_frac * max_iter))  # conv iterations are costly: a smaller cap
                res = run_one(model, x, opts, tol, cap, 1 if args.quick else args.repeats)
                row = dict(problem=name, solver=sname, tol=tol, m=model.cell.m, L=float(L), batch=x.shape[0],
                           max_iter=cap, **res)
                rows.append(row)
                print(f"{name:12s} tol={tol:g} {sname:12s} iters {res['batch_iterations']:5d} "
                      f"(median {res['median_iterations']:6.1f}) conv {res['converged']:.2f} "
                      f"cpu {res['cpu_s'] * 1e3:8.1f} ms (wall {res['time_s'] * 1e3:8.1f})", flush=True)
    meta = dict(
        date=datetime.datetime.now().isoformat(timespec="seconds"), **harness.machine_info("torch", "platform"),
        threads=args.threads, dtype=args.dtype, max_iter=max_iter,
        command="PYTHONPATH=src python benchmarks/bench_splitting.py" + (" --quick" if args.quick else ""),
    )
    suffix = "_quick" if args.quick else ""
    out = harness.write_json(ROOT / "results" / f"splitting{suffix}.json", dict(meta=meta, rows=rows))
    (ROOT / "results" / f"splitting_table{suffix}.md").write_text(table(rows, meta))
    print(f"wrote {out}")


def table(rows, meta) -> str:
    lines = [f"Command: `{meta['command']}` ({meta['dtype']}, {meta['threads']} thread, max_iter {meta['max_iter']}, "
             f"torch {meta['torch']}, {meta['date']})", ""]
    for tol in sorted({r["tol"] for r in rows}, reverse=True):
        lines += [f"tol = {tol:g}: batch iterations / CPU time to tol (ms, 1 thread); `—` = not all samples converged "
                  "(iterations shown are the cap: 2000 fc, 500 conv in the full run)", ""]
        probs = list(dict.fromkeys(r["problem"] for r in rows))
        solvers = list(dict.fromkeys(r["solver"] for r in rows))
        table = []
        for p in probs:
            cells = []
            for s in solvers:
                r = next(r for r in rows if r["problem"] == p and r["solver"] == s and r["tol"] == tol)
                mark = "" if r["converged"] == 1.0 else " —"
                cells.append(f"{r['batch_iterations']} / {r['cpu_s'] * 1e3:.0f}{mark}")
            L = next(r["L"] for r in rows if r["problem"] == p)
            table.append([f"{p} ({L:.2f})", *cells])
        lines += [harness.markdown_table(["problem (L)", *solvers], table), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
