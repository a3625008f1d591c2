"""Character-level DEQ-Transformer vs its weight-tied unrolled counterpart at equal depth.

Run from the repository root::

    OMP_NUM_THREADS=1 python benchmarks/bench_lm.py            # full: default `deqdiff lm --compare` + memory sweep
    OMP_NUM_THREADS=1 python benchmarks/bench_lm.py --quick    # smoke run (< 2 min)

What is measured:

1. ``deqdiff lm --compare`` with the job's defaults (``--epochs``/``--train-windows`` as given):
   the DEQ trains first; the unrolled model (the same cell applied L times from z = 0,
   backpropagated through every layer) trains with L = the DEQ's mean forward iterations over
   training, rounded up. Each trains in its own fresh process. Reported: test bits per
   character, forward/backward iterations, peak RSS growth during the training steps and the
   peak live tensor memory of a step (``--trace-memory``), time per epoch.
2. Memory sweep: for each ``--sweep-seq-len`` T (batch of ``--sweep-batch`` windows), a few
   training steps of the DEQ and of unrolled-L (same L), each setting in a fresh process: peak
   live tensor bytes of a step (``deqdiff.training.memtrace.TensorMemory``), bytes saved for
   backward by the forward, peak RSS growth with glibc's default settings and with
   ``harness.LIVE_RSS_ENV`` (freed blocks unmapped at once). The DEQ's backward solve recomputes
   one vjp graph of its cell per iteration (``--no-recompute-linearization`` in ``--sweep-options``
   holds it instead) next to the solver's history; the unrolled network keeps L layers'
   activations (attention weights grow as T²). ``--sweep-options`` passes model flags
   (``--d-model 128``).

JSON goes to ``benchmarks/results/lm.json`` (``lm_quick.json`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import harness

ROOT = Path(__file__).resolve().parent.parent


def _deqdiff(args: list[str], env: dict | None = None) -> None:
    """``deqdiff lm ARGS`` in a fresh process (one torch thread unless OMP_NUM_THREADS says otherwise)."""
    harness.run_cli(["lm", *args], env={"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **(env or {})},
                    cwd=ROOT, capture=False)


def compare(out: Path, extra: list[str]) -> dict:
    _deqdiff(["--compare", "--out", str(out), *extra])
    return json.loads((out / "results.json").read_text())  # with the per-step curves of the figure


def sweep_point(model: str, seq_len: int, batch: int, steps: int, out: Path, extra: list[str]) -> dict:
    """Memory (MiB) of ``steps`` training steps of ``model`` (stopped mid-epoch: no evaluation), each
    setting in a fresh process: peak RSS growth, and with ``--trace-memory`` the peak live tensor
    bytes of a step and the bytes saved for backward by its forward; then the peak RSS growth again
    under glibc settings that unmap freed blocks at once (harness.LIVE_RSS_ENV)."""
    point = {}
    for key, env in (("rss", None), ("rss_live_malloc", harness.LIVE_RSS_ENV)):
        run = out / f"{model}_T{seq_len}_{key}"
        _deqdiff(["--model", model, "--seq-len", str(seq_len), "--batch-size", str(batch), "--epochs", "1",
                  "--train-windows", str(batch * (steps + 1)), "--max-steps", str(steps), "--no-progress",
                  "--out", str(run), *(["--trace-memory"] if env is None else []), *extra], env)
        memory = json.loads((run / "metrics.json").read_text())["memory"]
        point[key] = memory["peak_rss_above_start_mib"]
        if env is None:
            point.update(tensor_peak=memory["tensor_peak_mib"], saved=memory["saved_mib"])
    return point


def timing(steps: int, depth: int) -> dict:
    """Median wall time of a training step (forward, backward, Adam) of the DEQ and of unrolled-L
    sharing its parameters, interleaved step by step in this process (so both see the same load)."""
    import statistics

    import torch
    import torch.nn.functional as F

    from deqdiff.data.text import load_corpus
    from deqdiff.models.transformer import unrolled_from_deq
    from deqdiff.training.lm import LMConfig, build_lm

    torch.set_num_threads(1)
    cfg = LMConfig()
    corpus = load_corpus()
    torch.manual_seed(0)
    deq = build_lm(cfg, corpus.vocab_size)
    models = {"deq": deq, f"unrolled-{depth}": unrolled_from_deq(deq, depth)}
    windows = corpus.windows("train", cfg.seq_len)

    def timed_step(model):
        def step(i: int) -> None:
            w = windows[i * cfg.batch_size:(i + 1) * cfg.batch_size]
            logits = model(w[:, :-1])
            F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1)).backward()
            model.zero_grad(set_to_none=True)
        return lambda i: harness.timed(lambda: step(i))

    def deq_iterations(i: int) -> float:  # read after the DEQ's step, outside its timing
        return float(deq.deq.last_info.forward.iterations.double().mean())

    calls = {"deq": timed_step(deq), "deq_iterations": deq_iterations, **{
        k: timed_step(m) for k, m in models.items() if k != "deq"}}
    times = harness.round_robin(calls, steps, warmup=1)  # the first step warms up
    iters = times.pop("deq_iterations")
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"steps": steps, "median_step_s": med, "ratio_deq_over_unrolled": med["deq"] / med[f"unrolled-{depth}"],
            "deq_fwd_iter_mean": statistics.mean(iters), "note": "untrained model (initial weights), forward + backward"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny run (smoke test)")
    p.add_argument("--epochs", type=int, default=None, help="epochs of the comparison (default: the job's)")
    p.add_argument("--train-windows", type=int, default=None, help="training windows (default: the job's)")
    p.add_argument("--sweep-seq-len", type=int, nargs="*", default=[64, 128, 256])
    p.add_argument("--sweep-batch", type=int, default=16)
    p.add_argument("--sweep-options", nargs=argparse.REMAINDER, default=[],
                   help="further `deqdiff lm` flags for the sweep's runs (e.g. --d-model 128); last on the line")
    p.add_argument("--sweep-steps", type=int, default=3)
    p.add_argument("--no-compare", action="store_true", help="only the memory sweep (needs --depth)")
    p.add_argument("--depth", type=int, default=None, help="unrolled depth of the sweep (default: the comparison's)")
    p.add_argument("--timing", type=int, default=0, help="also time this many interleaved steps side by side")
    p.add_argument("--out", default=None, help="JSON file (default: benchmarks/results/lm[_quick].json)")
    args = p.parse_args()
    extra: list[str] = []
    if args.quick:
        extra = ["--epochs", "1", "--train-windows", "64", "--valid-windows", "16"]
        args.sweep_seq_len, args.sweep_steps = [32, 64], 2
    if args.epochs:
        extra += ["--epochs", str(args.epochs)]
    if args.train_windows:
        extra += ["--train-windows", str(args.train_windows)]
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_lm_") as tmp:
        tmp = Path(tmp)
        result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "machine": {**harness.machine_info("platform", "cpus", "omp_num_threads"), "loadavg_start": load},
                  "command": " ".join(["python", "benchmarks/bench_lm.py", *sys.argv[1:]])}
        if not args.no_compare:
            result["compare"] = compare(tmp / "compare", [*extra, "--no-progress", "--trace-memory"])
            figure = ROOT / "benchmarks" / "results" / ("lm_loss_curves_quick.png" if args.quick else "lm_loss_curves.png")
            shutil.copyfile(tmp / "compare" / "loss_curves.png", figure)
            result["figure"] = str(figure.relative_to(ROOT))
            if not args.quick:  # the gallery's copy (docs/models.md)
                shutil.copyfile(figure, ROOT / "docs" / "figures" / "lm_loss_curves.png")
        elif args.depth is None:
            p.error("--no-compare needs --depth")
        depth = args.depth or result["compare"]["comparison"]["depth"]
        sweep = []
        for T in args.sweep_seq_len:
            point = {"seq_len": T, "batch": args.sweep_batch, "depth": depth}
            for model in ("deq", f"unrolled-{depth}"):
                point["deq" if model == "deq" else "unrolled"] = sweep_point(
                    model, T, args.sweep_batch, args.sweep_steps, tmp / "sweep", args.sweep_options)
            point["options"] = args.sweep_options
            point["ratio"] = {k: point["unrolled"][k] / point["deq"][k] if point["deq"][k] else None
                              for k in point["deq"]}
            sweep.append(point)
            print(json.dumps(point), flush=True)
        result["memory_sweep"] = sweep
        if args.timing:
            result["timing"] = timing(args.timing, depth)
            print(json.dumps(result["timing"]), flush=True)
        result["machine"]["loadavg_end"] = os.getloadavg()
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / ("lm_quick.json" if args.quick else "lm.json")
    harness.write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
