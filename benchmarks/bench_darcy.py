"""Darcy flow: FNO-DEQ vs the explicit FNO with equal parameters (``deqdiff operator darcy``).

Measures, on generated data (thresholded Gaussian random fields, finite-difference solutions):

1. one full run of both models in one process (the CLI's ``run``): held-out relative L2 (target
   ≤ 5e-2), error with noisy coefficient fields, seconds per epoch (median), forward/derivative
   solver iterations, unconverged solves, bytes autograd saves per batch;
2. training-step time side by side: the two models' steps interleaved on the same batches in
   one process, medians and their ratio (robust to the machine's load drifting);
3. peak resident memory of training, each model in a fresh process (:func:`probe`).

Usage: ``python benchmarks/bench_darcy.py`` (defaults: the CLI's defaults) → ``benchmarks/results/darcy.json``;
``--quick`` for a smoke run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import harness

HERE = Path(__file__).resolve().parent


def probe(name: str, cfg_json: str, steps: int, batch: int) -> dict:
    """In a fresh process: peak RSS before and after ``steps`` training steps of model ``name``
    on a batch of ``batch`` fields (large enough that training, not the imports, sets the peak)."""
    import torch

    from deqdiff.physics.darcy import generate
    from deqdiff.physics.neural_operator import OperatorConfig, build_model, relative_l2

    peak_rss_mib = harness.peak_rss_mib

    torch.set_num_threads(1)
    cfg = OperatorConfig(**json.loads(cfg_json))
    data = generate(OperatorConfig(**{**asdict(cfg), "n_train": batch, "n_test": 1, "batch": 1}).data_settings())
    a = torch.as_tensor(data.a[:batch], dtype=cfg.torch_dtype)
    u = torch.as_tensor(data.u[:batch], dtype=cfg.torch_dtype)
    model = build_model(cfg, name)
    model.set_normalization(a, u)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    built = peak_rss_mib()
    # warm-up step: lazy imports and allocator pools, not training memory
    relative_l2(model(a), u).mean().backward()
    opt.zero_grad(set_to_none=True)
    before = peak_rss_mib()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        relative_l2(model(a), u).mean().backward()
        opt.step()
    return {"model": name, "steps": steps, "batch": batch, "peak_rss_built_mib": built, "peak_rss_before_mib": before,
            "training_peak_over_built_mib": peak_rss_mib() - built, "peak_rss_after_mib": peak_rss_mib(),
            "peak_rss_growth_mib": peak_rss_mib() - before}


def side_by_side(cfg, steps: int, trained: dict | None = None) -> dict:
    """Interleaved training steps of both models on the same batches; medians (s) and ratio.
    ``trained``: state dicts to start from (the run's final models: the DEQ's iteration counts
    grow during training, so the ratio at the end of training is the one that matters)."""
    import torch

    from deqdiff.physics.darcy import generate
    from deqdiff.physics.neural_operator import OperatorConfig, build_model, relative_l2

    small = OperatorConfig(**{**asdict(cfg), "n_train": cfg.batch * 4, "n_test": 1})
    data = generate(small.data_settings())
    a = torch.as_tensor(data.a, dtype=cfg.torch_dtype)
    u = torch.as_tensor(data.u, dtype=cfg.torch_dtype)
    models = {n: build_model(cfg, n) for n in ("deq", "explicit")}
    for n, state in (trained or {}).items():
        models[n].load_state_dict(state)
    opts = {n: torch.optim.Adam(m.parameters(), lr=cfg.lr) for n, m in models.items()}
    if not trained:
        for m in models.values():
            m.set_normalization(a, u)

    def train_step(n: str):
        def run(step: int) -> None:
            i = (step % 4) * cfg.batch  # four batches in turn
            opts[n].zero_grad(set_to_none=True)
            relative_l2(models[n](a[i:i + cfg.batch]), u[i:i + cfg.batch]).mean().backward()
            opts[n].step()
        return run

    times = harness.interleaved_times({n: train_step(n) for n in models}, steps, warmup=1)  # step 0 warms up
    med = {n: statistics.median(t) for n, t in times.items()}
    return {"steps": steps, "median_step_s": med, "deq_over_explicit": med["deq"] / med["explicit"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(HERE / "results" / "darcy.json"))
    p.add_argument("--run-dir", default=None, help="folder of the full run (default: a temporary folder)")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--n-train", type=int, default=None)
    p.add_argument("--side-steps", type=int, default=20, help="interleaved steps per model")
    p.add_argument("--probe-steps", type=int, default=3, help="training steps of the memory probe")
    p.add_argument("--probe-batch", type=int, default=200, help="fields per batch in the memory probe")
    p.add_argument("--skip-run", action="store_true",
                   help="keep the full run's figures in --out and redo only the side-by-side timing and memory probes")
    p.add_argument("--quick", action="store_true", help="tiny settings (smoke test)")
    args = p.parse_args()

    import torch

    from deqdiff.physics.neural_operator import OperatorConfig, run

    torch.set_num_threads(1)
    over = {}
    if args.quick:
        over = dict(n_train=40, n_test=10, epochs=2, width=8, modes=4, resolution=16)
        args.side_steps, args.probe_steps, args.probe_batch = 4, 2, 20
    if args.epochs:
        over["epochs"] = args.epochs
    if args.n_train:
        over["n_train"] = args.n_train
    cfg = OperatorConfig(**over).validate()
    if args.skip_run:
        result = json.loads(Path(args.out).read_text())
        cfg = OperatorConfig(**result["config"])
        result["command_probes"] = " ".join(sys.argv)
    else:
        result = {"date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "command": " ".join(sys.argv),
                  **harness.machine_info("torch", "python", load_before="load_average"), "threads": 1,
                  "config": asdict(cfg)}
        run_dir = Path(args.run_dir or tempfile.mkdtemp())
        t0 = time.perf_counter()
        res = run(cfg, run_dir, progress=True, plots=bool(args.run_dir), checkpoint_every=0)
        result["run_wall_s"] = time.perf_counter() - t0
        result["run_dir"] = str(run_dir)
        result["models"] = res["models"]
        result["data"] = res["data"]
        result["target_rel_l2"] = 5e-2
        result["met"] = {n: m["held_out"]["rel_l2"] <= 5e-2 for n, m in res["models"].items()}
        result["load_after_run"] = os.getloadavg()
    trained = None
    ckpt = Path(result.get("run_dir", "")) / "checkpoint.pt"
    if ckpt.is_file():
        from deqdiff.physics.neural_operator import OPERATOR_FORMAT, read_checkpoint

        trained = {n: b["model"] for n, b in read_checkpoint(ckpt, format=OPERATOR_FORMAT)["done"].items()}
    result["side_by_side_trained"] = side_by_side(cfg, args.side_steps, trained) if trained else None
    result["side_by_side"] = side_by_side(cfg, args.side_steps)
    result["memory_probe"] = {}
    for name in cfg.models:  # each model in a fresh process
        result["memory_probe"][name] = harness.call_isolated(
            probe, name, json.dumps(asdict(cfg)), args.probe_steps, args.probe_batch, env={"OMP_NUM_THREADS": "1"}).data
    result["load_after"] = os.getloadavg()
    harness.write_json(args.out, result)
    for n, m in result["models"].items():
        print(f"{n}: held-out rel L2 {m['held_out']['rel_l2']:.4f} ({'met' if result['met'][n] else 'not met'}), "
              f"{m['epoch_time_s_median']:.1f} s/epoch, noise {[round(r['rel_l2'], 4) for r in m['noise']]}, "
              f"activations {m['saved_activations_mib_per_batch']:.1f} MiB, "
              f"training peak RSS +{result['memory_probe'][n]['training_peak_over_built_mib']:.0f} MiB "
              f"(growth over the steps {result['memory_probe'][n]['peak_rss_growth_mib']:.0f} MiB)")
    print("side by side (untrained):", result["side_by_side"])
    print("side by side (trained):", result["side_by_side_trained"])
    print("written", args.out)


if __name__ == "__main__":
    main()
