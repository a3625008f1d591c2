"""The Van der Pol family μ ∈ [LO, HI] (``deqdiff pinn vdp --mu-range LO HI``) trained as the
implicit PIDEQ flow map and, in the same run with the same seed, collocation points and
schedule, as the unrolled PIDEQ (autodiff through the same Anderson loop) and an MLP PINN of
about the same parameter count; errors per μ against ``scipy.integrate.solve_ivp``.

Run from the repository root::

    OMP_NUM_THREADS=1 python benchmarks/bench_vdp_family.py                 # defaults of the CLI
    OMP_NUM_THREADS=1 python benchmarks/bench_vdp_family.py --quick         # smoke run (~1 min)

Each model trains in a fresh process through the CLI (``python -m deqdiff.cli pinn vdp
--mu-range LO HI --model M …``, the exact commands are recorded), so its peak RSS (``ru_maxrss``
of that process) is its own; the memory a training step keeps for its backward pass
(``graph_bytes``, the distinct saved tensors of the autograd graph) is measured afterwards on
one batch of the same sampler. Epoch time: median wall and CPU (``process_time``) seconds of an
Adam step, and the mean CPU seconds of an L-BFGS step (20 inner iterations); on a shared machine
the CPU figures are the steadier ones. Writes ``benchmarks/results/vdp_family.json`` and
``vdp_family.md`` (``--quick``: ``vdp_family_quick.*``), figures in ``benchmarks/out/vdp_family``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import harness

MODELS = ("pideq", "mlp", "unrolled")
QUICK = ["--epochs", "20", "--lbfgs-steps", "2", "--batch", "64", "--n-test", "8", "--rollout-t-end", "2"]


def mlp_width_matching(cfg_kwargs: dict) -> tuple[int, int, int]:
    """``(width, mlp parameters, pideq parameters)``: the depth-4 MLP width whose parameter count
    is closest to the implicit PIDEQ's under the same settings."""
    from deqdiff.physics.models import count_parameters
    from deqdiff.physics.vdp import VdPConfig, build_model

    n_deq = count_parameters(build_model(VdPConfig.for_setup("conditioned", **cfg_kwargs)))
    best = min(range(4, 257), key=lambda w: abs(count_parameters(build_model(VdPConfig.for_setup(
        "conditioned", **{**cfg_kwargs, "model": "mlp", "width": w}))) - n_deq))
    n_mlp = count_parameters(build_model(VdPConfig.for_setup("conditioned", **{**cfg_kwargs, "model": "mlp", "width": best})))
    return best, n_mlp, n_deq


def step_graph_mib(results: dict) -> float:
    """MiB the autograd graph of one training loss keeps (same config, one fresh batch)."""
    import torch

    from deqdiff.physics.pde_runner import graph_bytes
    from deqdiff.physics.vdp import VdPConfig, build_trainer

    c = dict(results["config"])
    cfg = VdPConfig.for_setup(c.pop("setup"), **c)
    tr = build_trainer(cfg)
    batch = tr.sample_fn(torch.Generator().manual_seed(cfg.seed + 1), 0)
    loss = tr.loss_fn(tr.model, batch, torch.Generator().manual_seed(0))
    return graph_bytes(loss.total) / 2 ** 20


def history_times(out: Path) -> dict:
    import torch

    hist = torch.load(out / "checkpoint.pt", weights_only=True)["history"]
    adam = [h for h in hist if h["phase"] == "adam"][5:] or [h for h in hist if h["phase"] == "adam"]
    lbfgs = [h for h in hist if h["phase"] == "lbfgs"]
    return {"adam_epoch_wall_median_s": statistics.median(h["time"] for h in adam) if adam else None,
            "adam_epoch_cpu_median_s": statistics.median(h["cpu_time"] for h in adam) if adam else None,
            "lbfgs_step_cpu_mean_s": statistics.mean(h["cpu_time"] for h in lbfgs) if lbfgs else None,
            "train_cpu_s": sum(h["cpu_time"] for h in hist), "train_wall_s": sum(h["time"] for h in hist),
            "skipped_steps": sum(bool(h.get("skipped")) for h in hist)}


def _fmt(v, spec=".2e"):
    return "–" if v is None else format(v, spec)


def render(res: dict) -> str:
    lo, hi = res["mu_range"]
    m = res["models"]
    cfg0 = next(iter(m.values()))["config"]
    lines = [f"# Van der Pol family μ ∈ [{lo:g}, {hi:g}]: implicit PIDEQ vs MLP PINN vs unrolled PIDEQ", "",
             f"Measured {res['date']} on {res['machine']['summary']} (torch {res['machine']['torch']}, "
             f"1 thread per process; load average before/after {res['load_before'][0]:.1f} / "
             f"{res['load_after'][0]:.1f}; a shared machine: compare the CPU columns, not wall times). Command:", "",
             f"    {res['command'].rstrip()}", "",
             "Each model trained in its own process by:", ""]
    lines += [f"    {m[k]['command']}" for k in m] + [""]
    lines += ["Errors: relative L2 vs `solve_ivp` (DOP853, rtol 1e-11). *Held-out flows*: "
              f"{cfg0['n_test']} held-out initial states × 21 offsets Δ ∈ [0, h] at each μ; *rollout*: "
              f"y_(k+1) = y(h; y_k, μ) from y(0) = (0, 0.1) to t = {cfg0['rollout_t_end']:g}. "
              "Interpolation: five held-out μ inside the range (pooled / mean / max over them); "
              "extrapolation: the two μ just outside, reported apart.", ""]
    cols = ["model", "params", "held-out (interp.)", "rollout mean (interp.)", "rollout max (interp.)",
            "held-out (extrap.)", "rollout mean (extrap.)", "Adam epoch CPU ms", "L-BFGS step CPU ms",
            "train CPU s", "graph MiB/step", "peak RSS MiB"]
    rows = []
    for k, r in m.items():
        e, t = r["metrics"], r["times"]
        rows.append([k, r["parameters"], _fmt(e.get("held_out_rel_l2")), _fmt(e.get("rollout_rel_l2_mean")),
                     _fmt(e.get("rollout_rel_l2_max")), _fmt(e.get("extrapolation_held_out_rel_l2")),
                     _fmt(e.get("extrapolation_rollout_rel_l2_mean")), _fmt(1e3 * t["adam_epoch_cpu_median_s"], ".1f"),
                     _fmt(1e3 * t["lbfgs_step_cpu_mean_s"] if t["lbfgs_step_cpu_mean_s"] else None, ".0f"),
                     _fmt(t["train_cpu_s"], ".1f"), _fmt(r["graph_mib"], ".2f"), _fmt(r["peak_rss_mib"], ".0f")])
    if "skip_only_held_out_rel_l2" in next(iter(m.values()))["metrics"]:
        e = next(iter(m.values()))["metrics"]
        rows.append(["Taylor skip alone", 0, _fmt(e["skip_only_held_out_rel_l2"]),
                     _fmt(e["skip_only_rollout_rel_l2_mean"]), "–", _fmt(e.get("extrapolation_skip_only_held_out_rel_l2")),
                     _fmt(e.get("extrapolation_skip_only_rollout_rel_l2_mean")), "–", "–", "–", "–", "–"])
    lines += [harness.markdown_table(cols, rows), "",
              "Peak RSS is that of the whole process (torch alone holds ~400 MiB); the graph column is what "
              "one training step keeps for its backward pass at the default 256 points.", ""]
    if res["ratios"]:
        lines += ["Ratios (same run): " + "; ".join(f"{k.replace('_', ' ')} {v:.2f}×" for k, v in res["ratios"].items()), ""]
    lines += ["Per μ (relative L2, held-out flows / rollout):", ""]
    mus = [(r["mu"], r["regime"]) for r in next(iter(m.values()))["per_mu"]]
    cols = ["μ", "regime", *m.keys()]
    rows = [[f"{mu:g}", regime, *(f"{m[k]['per_mu'][i]['held_out_rel_l2']:.2e} / {m[k]['per_mu'][i]['rollout_rel_l2']:.2e}"
                                  for k in m)] for i, (mu, regime) in enumerate(mus)]
    lines += [harness.markdown_table(cols, rows), ""]
    lines += ["## For the README / RESULTS", ""]
    k0 = "pideq" if "pideq" in m else next(iter(m))
    e = m[k0]["metrics"]
    lines += [f"Van der Pol family μ ∈ [{lo:g}, {hi:g}] (`deqdiff pinn vdp --mu-range {lo:g} {hi:g}`, one flow map for "
              f"all μ): {k0} held-out relative L2 {e['held_out_rel_l2']:.1e} on five held-out μ inside the "
              f"range, rollout to t = {cfg0['rollout_t_end']:g} mean {e['rollout_rel_l2_mean']:.1e} (max "
              f"{e['rollout_rel_l2_max']:.1e}); extrapolation (μ = "
              f"{', '.join(f'{v:g}' for v in e.get('extrapolation_mus', []))}) held-out "
              f"{_fmt(e.get('extrapolation_held_out_rel_l2'), '.1e')}"
              + (f" (the exact Taylor skip alone: held-out {e['skip_only_held_out_rel_l2']:.1e}, rollout mean "
                 f"{e['skip_only_rollout_rel_l2_mean']:.1e}"
                 + ("; the rollouts are worse than the skip's" if e["rollout_rel_l2_mean"] > e["skip_only_rollout_rel_l2_mean"]
                    else "") + ")" if "skip_only_held_out_rel_l2" in e else "")
              + ". Baselines in the same run: "
              + "; ".join(f"{k} held-out {m[k]['metrics']['held_out_rel_l2']:.1e}, rollout mean "
                          f"{m[k]['metrics']['rollout_rel_l2_mean']:.1e}" for k in m if k != k0)
              + (". " + "; ".join(f"{k.replace('_', ' ')} {v:.2f}×" for k, v in res["ratios"].items()) if res["ratios"] else "")
              + f". Command: `{res['command'].rstrip()}`.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mu-range", type=float, nargs=2, default=(0.5, 2.0), metavar=("LO", "HI"))
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {','.join(MODELS)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a short smoke run (" + " ".join(QUICK) + ")")
    ap.add_argument("--extra", default="", help="more flags for every model's `deqdiff pinn vdp`, e.g. '--epochs 1000'")
    ap.add_argument("--out", default=None, help="results stem (default benchmarks/results/vdp_family[_quick])")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per model before it is stopped")
    ap.add_argument("--render-only", action="store_true", help="rewrite the markdown from the JSON of an earlier run")
    args = ap.parse_args()
    if args.render_only:
        stem = Path(args.out) if args.out else harness.RESULTS / ("vdp_family_quick" if args.quick else "vdp_family")
        stem.with_suffix(".md").write_text(render(json.loads(stem.with_suffix(".json").read_text())))
        return
    models = [m for m in args.models.split(",") if m]
    bad = [m for m in models if m not in MODELS]
    if bad:
        sys.exit(f"--models: unknown {bad}; choose from {MODELS}")
    lo, hi = args.mu_range
    stem = Path(args.out) if args.out else harness.RESULTS / ("vdp_family_quick" if args.quick else "vdp_family")
    runs = Path("benchmarks") / "out" / ("vdp_family_quick" if args.quick else "vdp_family")  # from the root
    common = ["pinn", "vdp", "--mu-range", f"{lo:g}", f"{hi:g}", "--seed", str(args.seed), "--threads", "1",
              "--no-progress", *(QUICK if args.quick else []), *shlex.split(args.extra)]
    known = argparse.ArgumentParser(add_help=False)
    known.add_argument("--width", type=int)
    known.add_argument("--taylor", type=int)
    given = vars(known.parse_known_args(common)[0])
    width_args = {"mu_range": (lo, hi), **{k: v for k, v in given.items() if v is not None}}
    mlp_width, n_mlp, n_deq = mlp_width_matching(width_args)
    load_before = list(__import__("os").getloadavg())
    res = {"benchmark": "vdp_family", "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "command": "OMP_NUM_THREADS=1 python benchmarks/bench_vdp_family.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
           "mu_range": [lo, hi], "load_before": load_before, "models": {}, "ratios": {},
           "mlp_width": mlp_width, "note": f"MLP 4×{mlp_width} ({n_mlp} parameters) vs PIDEQ {n_deq} parameters"}
    for kind in models:
        out = runs / kind
        argv = [*common, "--model", kind, "--out", str(out)]
        if kind == "mlp":
            argv += ["--width", str(mlp_width)]
        print(f"[{datetime.now(timezone.utc):%H:%M:%S}] training {kind} …", flush=True)
        t0 = time.perf_counter()
        run = harness.run_cli(argv, env={"OMP_NUM_THREADS": "1"}, timeout=args.timeout, cwd=harness.ROOT)
        out = harness.ROOT / out
        r = json.loads((out / "results.json").read_text())
        res["models"][kind] = {
            "command": "OMP_NUM_THREADS=1 deqdiff " + " ".join(shlex.quote(a) for a in argv),
            "parameters": r["parameters"], "metrics": r["metrics"], "per_mu": r["per_mu"],
            "training": r["training"], "times": history_times(out), "process_wall_s": time.perf_counter() - t0,
            "peak_rss_mib": run.peak_rss_mib, "graph_mib": step_graph_mib(r), "files": r["files"],
            "config": r["config"]}
        print(f"  {kind}: held-out {r['metrics']['held_out_rel_l2']:.2e}, rollout mean "
              f"{r['metrics']['rollout_rel_l2_mean']:.2e} ({time.perf_counter() - t0:.0f} s)", flush=True)
        harness.write_json(stem.with_suffix(".json"), res)
    t = {k: v["times"]["adam_epoch_cpu_median_s"] for k, v in res["models"].items()}
    tot = {k: v["times"]["train_cpu_s"] for k, v in res["models"].items()}
    if "pideq" in t:
        for other in ("mlp", "unrolled"):
            if other in t:
                res["ratios"][f"pideq/{other} Adam epoch CPU"] = t["pideq"] / t[other]
                res["ratios"][f"pideq/{other} training CPU"] = tot["pideq"] / tot[other]
    res["load_after"] = list(__import__("os").getloadavg())
    res["machine"] = harness.machine_info()
    harness.write_json(stem.with_suffix(".json"), res)
    stem.with_suffix(".md").write_text(render(res))
    print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
