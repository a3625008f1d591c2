"""Training tools on the digits conv DEQ (and optionally MDEQ): exact vs phantom gradients,
with/without fixed-point correction, float32 vs bf16, eager vs compiled cell.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_training_tools.py             # ~25 min on 2 loaded cores
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_training_tools.py --quick     # smoke run

Two parts, both in one process:

* ``training``: each variant trained with ``deqdiff.training.train`` from the same seed for
  ``--epochs`` epochs (cosine schedule over the run, thesis defaults otherwise); reported: held-out
  accuracy and loss after the last epoch, the median epoch time, forward iterations.
* ``steps``: one model trained for one epoch, its weights copied into every variant; then training
  steps (forward + loss + backward, no optimizer update, so every variant sees the same weights and
  batch) are timed round-robin over the variants (``--rounds`` rounds, after warm-up, including the
  compilation of the compiled cell), so machine-load changes hit every variant alike. Reported: the
  median forward time, backward time and step time, and their ratios to exact float32 eager.

Results: ``benchmarks/results/training_tools.json`` (``--quick``: ``training_tools_quick.json``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

import harness
from deqdiff.data import load_dataset
from deqdiff.training import TrainConfig, build_model, train
from deqdiff.training.correction import outputs_at_iterates

#: training variants: name → TrainConfig settings (correction iterations: the conv solve takes
#: ~10–17 Anderson iterations at tol 1e-2, so 3 and 6 are early and middle iterates)
VARIANTS = {
    "exact": {},
    "phantom": {"grad": "phantom"},
    "exact+correction": {"correction": [3, 6]},
    "phantom+correction": {"grad": "phantom", "correction": [3, 6]},
    "bf16": {"amp": "bf16"},
}
#: step-time variants: the training variants and the compiled cell
STEP_VARIANTS = {**VARIANTS, "compiled": {"compile": True},
                 # float32 with the derivative solver bf16 uses (GMRES), to separate precision from solver
                 "exact-gmres": {"backward_solver": "gmres"}}


def _config(model: str, epochs: int, limit: int | None, **tools) -> TrainConfig:
    return TrainConfig(model=model, epochs=epochs, progress=False, seed=0, train_limit=limit, test_limit=limit, **tools)


def run_training(model: str, epochs: int, limit: int | None, names: list[str]) -> list[dict]:
    rows = []
    for name in names:
        t0 = time.perf_counter()
        result = train(_config(model, epochs, limit, **VARIANTS[name]))
        wall = time.perf_counter() - t0
        final = result.final
        rows.append({
            "model": model, "variant": name, "epochs": epochs,
            "test_acc": final["test"]["acc"], "test_loss": final["test"]["loss"], "train_loss": final["train"]["loss"],
            "epoch_time_median_s": statistics.median(e["time_s"] for e in result.history["epochs"]),
            "epoch_times_s": [e["time_s"] for e in result.history["epochs"]],
            "fwd_iter_mean": final["train"].get("fwd_iter_mean"), "bwd_iter_mean": final["train"].get("bwd_iter_mean"),
            "wall_s": wall,
        })
        print(json.dumps(rows[-1]), flush=True)
    return rows


class _Stepper:
    """One variant's model (weights copied from a trained model) and its timed training step."""

    def __init__(self, model_name: str, name: str, state: dict, data, limit):
        self.name = name
        tools = dict(STEP_VARIANTS[name])
        backward_solver = tools.pop("backward_solver", None)
        self.config = _config(model_name, 1, limit, **tools)
        torch.manual_seed(0)
        self.model = build_model(self.config, data.image_shape, data.num_classes)
        self.model.load_state_dict(state)
        if backward_solver is not None:
            self.model.deq.solver_options["backward_solver"] = backward_solver
        self.model.train()

    def step(self, x, y) -> tuple[float, float]:
        cfg, model = self.config, self.model
        model.zero_grad(set_to_none=True)
        amp = torch.autocast("cpu", dtype=torch.bfloat16) if cfg.amp == "bf16" else nullcontext()
        t0 = time.perf_counter()
        with amp:
            logits = model(x, store_trajectory=True) if cfg.correction else model(x)
        loss = F.cross_entropy(logits.float(), y)
        if cfg.correction:
            with amp:
                extra = outputs_at_iterates(model, x, cfg.correction)
            for w, out in zip(cfg.correction_weights, extra):
                loss = loss + w * F.cross_entropy(out.float(), y)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1


def run_steps(model_name: str, limit: int | None, names: list[str], rounds: int, warmup: int, batch: int) -> list[dict]:
    data = load_dataset("digits", None, seed=0, test_fraction=0.2)
    base = train(_config(model_name, 1, limit))  # one epoch: solver iteration counts of a model in training
    state = base.model.state_dict()
    idx = torch.arange(batch)
    x = data.images("train", idx, dtype=torch.float32, device="cpu")
    y = data.labels("train", idx, device="cpu")
    steppers = [_Stepper(model_name, n, state, data, limit) for n in names]
    compile_s = {}
    for s in steppers:
        t0 = time.perf_counter()
        for _ in range(warmup):
            s.step(x, y)
        compile_s[s.name] = time.perf_counter() - t0
    times = harness.round_robin({s.name: (lambda i, s=s: s.step(x, y)) for s in steppers}, rounds)
    ref = None
    rows = []
    for s in steppers:
        fwd = statistics.median(t[0] for t in times[s.name])
        bwd = statistics.median(t[1] for t in times[s.name])
        step = statistics.median(t[0] + t[1] for t in times[s.name])
        if ref is None:
            ref = (fwd, bwd, step)
        rows.append({"model": model_name, "variant": s.name, "batch": batch, "rounds": rounds,
                     "fwd_median_s": fwd, "bwd_median_s": bwd, "step_median_s": step,
                     "fwd_ratio": fwd / ref[0], "bwd_ratio": bwd / ref[1], "step_ratio": step / ref[2],
                     "warmup_s": compile_s[s.name]})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def tables(results: dict) -> str:
    """Markdown tables of a results file (``--tables``)."""
    training = [[r["model"], r["variant"], r["epochs"], f"{100 * r['test_acc']:.2f} %", f"{r['test_loss']:.4f}",
                 f"{r['epoch_time_median_s']:.1f}", f"{r['fwd_iter_mean']:.1f}",
                 "—" if r["bwd_iter_mean"] is None else f"{r['bwd_iter_mean']:.1f}"] for r in results["training"]]
    steps = [[r["model"], r["variant"], f"{1e3 * r['fwd_median_s']:.0f}", f"{1e3 * r['bwd_median_s']:.0f}",
              f"{1e3 * r['step_median_s']:.0f}", f"{r['fwd_ratio']:.2f}", f"{r['bwd_ratio']:.2f}", f"{r['step_ratio']:.2f}"]
             for r in results["steps"]]
    return "\n".join([
        harness.markdown_table(["model", "variant", "epochs", "test acc", "test loss", "epoch time (median, s)",
                                "fwd iters", "bwd iters"], training), "",
        harness.markdown_table(["model", "variant", "forward (ms)", "backward (ms)", "step (ms)", "forward ×",
                                "backward ×", "step ×"], steps)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="conv", help="comma-separated: conv, mdeq")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--rounds", type=int, default=15, help="timed steps per variant (round-robin)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first (compiles the cell)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--variants", default=",".join(VARIANTS), help="training variants (comma-separated)")
    p.add_argument("--step-variants", default=",".join(STEP_VARIANTS), help="step-time variants (comma-separated; "
                   "exact-gmres: float32 with GMRES derivative solves, as bf16 uses)")
    p.add_argument("--skip-training", action="store_true")
    p.add_argument("--skip-steps", action="store_true")
    p.add_argument("--quick", action="store_true", help="1 epoch on 128 images, 3 rounds")
    p.add_argument("--out", default=None)
    p.add_argument("--tables", metavar="JSON", help="print the markdown tables of a results file and exit")
    args = p.parse_args()
    if args.tables:
        print(tables(json.loads(Path(args.tables).read_text())))
        return
    limit = None
    if args.quick:
        args.epochs, args.rounds, args.warmup, limit = 1, 3, 2, 128
    out = Path(args.out or f"benchmarks/results/training_tools{'_quick' if args.quick else ''}.json")
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_training_tools.py "
                   + " ".join(a for a in os.sys.argv[1:]),
        **harness.machine_info("torch", "threads"),
        "uptime_start": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
    }
    results = {"meta": meta, "training": [], "steps": []}
    for model in args.models.split(","):
        if not args.skip_steps:
            results["steps"] += run_steps(model, limit, args.step_variants.split(","), args.rounds, args.warmup, args.batch)
        if not args.skip_training:
            results["training"] += run_training(model, args.epochs, limit, args.variants.split(","))
        meta["uptime_end"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
        harness.write_json(out, results)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
