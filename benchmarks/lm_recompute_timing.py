"""Time cost of activation recomputation in the DEQ-Transformer's implicit backward, side by side.

Run from the repository root::

    OMP_NUM_THREADS=1 python benchmarks/lm_recompute_timing.py --steps 16                      # initial weights
    OMP_NUM_THREADS=1 python benchmarks/lm_recompute_timing.py --steps 16 --checkpoint RUN/checkpoint.pt

Two copies of the ``deqdiff lm`` DEQ with the same weights: the backward solve holding the vjp
graph of the cell at z* (``recompute_linearization=False``) and recomputing it at every iteration
(``True``, the job's default). Their training steps (forward + backward on the same batch of 32
windows, gradients discarded) alternate in one process, so both see the same load; reported are
the median step and backward times, their ratio, the backward iterations (identical when the
gradients agree) and, untimed afterwards, each variant's peak live tensor bytes of one step
(``TensorMemory``) and the largest relative difference of their gradients. JSON goes to
``benchmarks/results/lm_recompute_timing.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import harness
import torch
import torch.nn.functional as F

from deqdiff.data.text import load_corpus
from deqdiff.training.lm import LM_FORMAT, LMConfig, build_lm
from deqdiff.training.memtrace import TensorMemory

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=16, help="timed steps per variant (after one warm-up step each)")
    p.add_argument("--checkpoint", default=None, help="a `deqdiff lm` checkpoint.pt of the DEQ (default: initial weights)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lm_recompute_timing.json"))
    args = p.parse_args()
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    torch.set_num_threads(1)
    corpus = load_corpus()
    cfg, state = LMConfig(), None
    if args.checkpoint:
        from deqdiff.training.checkpoint import read_checkpoint

        ckpt = read_checkpoint(args.checkpoint, format=LM_FORMAT)
        cfg, state = LMConfig.from_dict(dict(ckpt["config"], out=None, progress=False)), ckpt["model"]
    if cfg.model != "deq":
        p.error(f"--checkpoint: a DEQ checkpoint is needed, this one is {cfg.model}")
    models = {}
    for recompute in (False, True):
        torch.manual_seed(cfg.seed)
        model = build_lm(LMConfig.from_dict(dict(cfg.to_dict(), recompute_linearization=recompute)), corpus.vocab_size)
        if state is not None:
            model.load_state_dict(state)
        models["recompute" if recompute else "held"] = model
    windows = corpus.windows("train", cfg.seq_len)
    n = windows.shape[0] // cfg.batch_size

    def batch(i: int):
        j = (i * 7) % n  # spread over the split
        return windows[j * cfg.batch_size:(j + 1) * cfg.batch_size].clone()

    def step(model, w):
        logits = model(w[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1))
        t0 = time.perf_counter()
        loss.backward()
        return time.perf_counter() - t0

    def timed(name: str):
        model = models[name]

        def call(i: int):
            w = batch(i)
            t0 = time.perf_counter()
            backward = step(model, w)
            total = time.perf_counter() - t0
            model.zero_grad(set_to_none=True)
            info = model.deq.last_info
            return total, backward, float(info.derivatives[0].iterations.double().mean())
        return call

    load = os.getloadavg()
    results = harness.round_robin({k: timed(k) for k in models}, args.steps, warmup=1)
    summary = {}
    for name, rows in results.items():
        summary[name] = {"median_step_s": statistics.median(r[0] for r in rows),
                         "median_backward_s": statistics.median(r[1] for r in rows),
                         "backward_iterations_mean": statistics.mean(r[2] for r in rows)}
    # untimed: peak live tensor bytes of one step and gradient agreement on the first batch
    grads = {}
    w0 = batch(0)  # made outside the count: TensorMemory would count a view of the whole split (a storage
    # made before it started and never freed) at the split's full size for the whole step
    for name, model in models.items():
        with TensorMemory() as mem:
            step(model, w0)
        summary[name]["step_tensor_peak_mib"] = mem.peak_mib
        grads[name] = torch.cat([q.grad.reshape(-1) for q in model.parameters()])
        model.zero_grad(set_to_none=True)
    diff = float((grads["recompute"] - grads["held"]).norm() / grads["held"].norm())
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/lm_recompute_timing.py", *sys.argv[1:]]),
        "machine": {**harness.machine_info("platform", "cpus", "omp_num_threads"), "loadavg_start": load,
                    "loadavg_end": os.getloadavg()},
        "weights": args.checkpoint or "initial (seed 0)", "batch": cfg.batch_size, "seq_len": cfg.seq_len,
        "steps": args.steps, **summary,
        "ratio_step_recompute_over_held": summary["recompute"]["median_step_s"] / summary["held"]["median_step_s"],
        "ratio_backward_recompute_over_held": summary["recompute"]["median_backward_s"] / summary["held"]["median_backward_s"],
        "gradient_relative_difference": diff,
    }
    harness.write_json(args.out, result)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
