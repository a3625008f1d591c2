"""Inverse-problem DEQ vs deep unrolling (Gilton, Ongie & Willett 2021) on digits: PSNR on the
held-out split, PSNR with 2× and 4× the training iterations at test time, DEQ iterations, time
per epoch and the memory of one training step.

Each task trains both models through ``deqdiff.training.inverse.train_inverse`` with the
``deqdiff inverse`` defaults (unless flags change them) and reports with
``deqdiff.training.inverse_report.assess``. The peak memory of one training step is measured
for each model in a fresh process (:func:`memory_worker`): one warm-up step, the resident
high-water mark reset (``/proc/self/clear_refs``), one step, the rise of ``VmHWM``; with it
the bytes autograd saves for the backward pass. The warm-up step uses one image (lazy imports
without pooling the batch's memory) and glibc returns freed blocks of ≥ 64 KiB to the system.

    OMP_NUM_THREADS=1 python benchmarks/bench_inverse.py --tasks deblur,denoise --epochs 3

writes ``benchmarks/results/inverse.json`` (and the figures of each task under
``benchmarks/results/inverse_<task>/``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

import harness

ROOT = Path(__file__).resolve().parent


def memory_worker(config_json: str, kind: str) -> dict:
    from deqdiff.training.inverse import InverseConfig, build_inverse_model, load_task_data
    from deqdiff.training.inverse_report import step_memory

    torch.set_num_threads(1)
    cfg = InverseConfig.from_dict(json.loads(config_json))
    data = load_task_data(InverseConfig.from_dict({**cfg.to_dict(), "train_limit": cfg.batch_size, "test_limit": 1}))
    model = build_inverse_model(cfg, kind)
    y, x = data.batch("train", slice(0, cfg.batch_size), dtype=getattr(torch, cfg.dtype))
    step_memory(model, y[:1], x[:1])  # warm-up on one image: lazy imports, without pooling the batch's memory
    return step_memory(model, y, x)


def fresh_memory(cfg, kind: str) -> dict:
    # blocks from 64 KiB up are mmapped and returned when freed, so the RSS follows live memory
    env = {"OMP_NUM_THREADS": "1", **harness.LIVE_RSS_ENV}
    return harness.call_isolated(memory_worker, json.dumps(cfg.to_dict()), kind, env=env, timeout=1800).data


def run_task(task: str, args) -> dict:
    from deqdiff.cli.inverse import _print_summary
    from deqdiff.training.inverse import InverseConfig, load_task_data, train_inverse
    from deqdiff.training.inverse_report import assess, plot_examples, plot_psnr_curve, plot_training

    overrides = {k: v for k, v in dict(epochs=args.epochs, train_limit=args.train_limit, test_limit=args.test_limit,
                                      k=args.k, hidden=args.hidden, seed=args.seed).items() if v is not None}
    cfg = InverseConfig(task=task, **overrides)
    data = load_task_data(cfg)
    out = ROOT / "results" / f"inverse_{task}"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    result = train_inverse(cfg, data, progress=not args.no_progress)
    train_s = time.perf_counter() - t0
    report = assess(result, data)
    for kind in result.models:
        report["models"][kind]["step_memory_fresh_process"] = fresh_memory(cfg, kind)
    files = {"examples": out / "examples.png", "psnr_vs_iterations": out / "psnr_vs_iterations.png",
             "training": out / "training.png"}
    plot_examples(result.models, data, cfg, files["examples"])
    plot_psnr_curve(report, cfg, files["psnr_vs_iterations"])
    plot_training(result.history, files["training"])
    _print_summary(report, cfg, files)
    return {"config": cfg.to_dict(), "train_wall_s": train_s, "report": report,
            "history": {k: h["epochs"] for k, h in result.history.items()},
            "files": {k: str(v.relative_to(ROOT.parent)) for k, v in files.items()}}


def _f(v, fmt="{:.2f}") -> str:
    return "–" if v is None else fmt.format(v)


def render(paths: list[str], out_json: Path, out_md: Path) -> None:
    """Merge per-task result files into ``out_json`` and write the results section ``out_md``."""
    merged: dict = {"runs": [], "tasks": {}}
    for path in paths:
        d = json.loads(Path(path).read_text())
        merged["runs"].append({k: d[k] for k in ("date", "command", "torch", "threads", "load_average_start",
                                                  "load_average_end") if k in d})
        merged["tasks"].update(d["tasks"])
    harness.write_json(out_json, merged)
    lines = ["## Inverse problems: DEQ vs deep unrolling (Gilton, Ongie & Willett 2021)", ""]
    for r in merged["runs"]:
        lines.append(f"- `{r['command']}` — {r['date']}, torch {r['torch']}, {r['threads']} thread, load average "
                     f"{r['load_average_start'][0]:.1f} at start / {r.get('load_average_end', [float('nan')])[0]:.1f} "
                     "at end (2 shared cores)")
    lines.append("")
    columns = ["task", "model", "PSNR (dB)", "2× iterations", "4× iterations", "forward iterations (mean/max)",
               "time per epoch (s)", "step memory: saved / peak RSS rise (MiB)"]
    rows, verdicts = [], []
    for task, t in merged["tasks"].items():
        rep, cfg = t["report"], t["config"]
        rows.append([task, "measurement y", f"{rep['measurement_psnr']:.2f}", "", "", "", "", ""])
        for kind, e in rep["models"].items():
            x = e["extra_iterations"]
            mem = e.get("step_memory_fresh_process", e["step_memory"])
            its = (f"{e['fwd_iter_mean']:.1f} / {e['fwd_iter_max']} (res ≤ {e['fwd_res_max']:.1e}, "
                   f"{e['fwd_converged']:.0%} converged)" if kind == "deq" else f"K = {cfg['k']} (fixed)")
            name = "DEQ" if kind == "deq" else f"unrolled-{cfg['k']}"
            rows.append([task, name, f"{e['psnr']:.2f}", f"{x['2']['psnr']:.2f}", f"{x['4']['psnr']:.2f}", its,
                         _f(e['time_per_epoch_s'], '{:.1f}'), f"{mem['saved_mib']:.2f} / {mem['peak_mib']:.1f}"])
        m = rep["models"]
        if "deq" in m and "unrolled" in m:
            d, u = m["deq"], m["unrolled"]
            verdicts.append(f"- {task}: DEQ {d['psnr']:.2f} dB vs unrolled-{cfg['k']} {u['psnr']:.2f} dB "
                            f"({'DEQ better or equal' if d['psnr'] >= u['psnr'] else 'unrolled better'}); at 4× the "
                            f"training iterations the unrolled network goes {u['psnr']:.2f} → "
                            f"{u['extra_iterations']['4']['psnr']:.2f} dB, the DEQ {d['psnr']:.2f} → "
                            f"{d['extra_iterations']['4']['psnr']:.2f} dB; learned cell's ‖∂f/∂z‖₂ at z* "
                            f"{d['lipschitz_at_fixed_point']['mean']:.3f} mean, "
                            f"{d['lipschitz_at_fixed_point']['max']:.3f} max")
    lines += [harness.markdown_table(columns, rows), "", *verdicts, ""]
    out_md.write_text("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default="deblur,denoise")
    p.add_argument("--epochs", type=int, default=None, help="default: the CLI's")
    p.add_argument("--train-limit", type=int, default=None)
    p.add_argument("--test-limit", type=int, default=None)
    p.add_argument("--k", type=int, default=None)
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--out", default=str(ROOT / "results" / "inverse.json"))
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--remeasure-memory", metavar="JSON",
                   help="measure the one-step memory of each model of this result file again (in place)")
    p.add_argument("--render", nargs="+", metavar="JSON",
                   help="merge these result files into --out and write the markdown section next to it")
    args = p.parse_args()
    if args.remeasure_memory:
        from deqdiff.training.inverse import InverseConfig

        path = Path(args.remeasure_memory)
        d = json.loads(path.read_text())
        for t in d["tasks"].values():
            cfg = InverseConfig.from_dict(t["config"])
            for kind, e in t["report"]["models"].items():
                e["step_memory_fresh_process"] = fresh_memory(cfg, kind)
                print(kind, e["step_memory_fresh_process"])
        harness.write_json(path, d)
        return
    if args.render:
        out = Path(args.out)
        render(args.render, out, out.with_suffix(".md"))
        return
    torch.set_num_threads(1)
    results = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv),
               **harness.machine_info("torch", "threads", load_average_start="load_average"), "tasks": {}}
    out = Path(args.out)
    for task in args.tasks.split(","):
        results["tasks"][task] = run_task(task, args)
        results["load_average_end"] = os.getloadavg()
        harness.write_json(out, results)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
