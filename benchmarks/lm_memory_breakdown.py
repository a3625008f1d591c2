"""Where the DEQ-Transformer's training memory goes: live tensor bytes through one training step.

Run from the repository root (one model per process)::

    OMP_NUM_THREADS=1 python benchmarks/lm_memory_breakdown.py --model deq --seq-len 64 --batch 16
    OMP_NUM_THREADS=1 python benchmarks/lm_memory_breakdown.py --model unrolled-8 --seq-len 64 --batch 16

One forward + backward of the ``deqdiff lm`` model (initial weights of seed 0, a batch of training
windows, after a one-window warm-up) under :class:`deqdiff.training.memtrace.TensorMemory`,
which counts the bytes of every tensor storage the step creates until it is freed. For the DEQ
the engine's phases are marked by wrapping its functions (diagnostics only, nothing changes):
the forward solve, the linearization of the cell at z* (its vjp graph), the implicit backward
solve, the parameters' vjp. Printed and written as JSON (``--out``): the peak of each phase, the
bytes live at its start and end, and the innermost ``deqdiff`` frames at the step's peak. The
bytes saved for backward by the forward (:class:`~deqdiff.training.memtrace.SavedTensors`) are
reported too.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from deqdiff.data.text import load_corpus
from deqdiff.training.lm import LMConfig, build_lm
from deqdiff.training.memtrace import MIB, SavedTensors, TensorMemory


class Phases:
    """Phase marks on a :class:`TensorMemory`: per phase the peak and the bytes live at entry and exit."""

    def __init__(self, mem: TensorMemory):
        self.mem, self.stack, self.rows = mem, [], []
        self.peak_where: list[str] = []
        self._peak_seen = 0

    def wrap(self, module, name: str, label: str) -> None:
        original = getattr(module, name)

        def wrapped(*args, **kwargs):
            self.stack.append((label, self.mem.current, self.mem.peak))
            self.mem.peak = self.mem.current  # this phase's own peak
            try:
                return original(*args, **kwargs)
            finally:
                label_, start, outer_peak = self.stack.pop()
                self.rows.append({"phase": label_, "live_at_start_mib": start / MIB, "peak_mib": self.mem.peak / MIB,
                                  "live_at_end_mib": self.mem.current / MIB})
                self.mem.peak = max(outer_peak, self.mem.peak)

        setattr(module, name, wrapped)


class TracedMemory(TensorMemory):
    """TensorMemory that also records the innermost ``deqdiff`` frames each time the peak rises."""

    def __init__(self):
        super().__init__()
        self.where: list[str] = []
        self._record = 0

    def _track(self, t):
        before = self.peak
        super()._track(t)
        if self.peak > before and self.peak > self._record:
            self._record = self.peak
            self.where = [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in traceback.extract_stack()
                          if f"{os.sep}deqdiff{os.sep}" in f.filename][-6:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deq", help="deq | unrolled-L")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--d-model", type=int, default=None)
    p.add_argument("--checkpoint", default=None, help="a `deqdiff lm` checkpoint.pt: its trained weights (its settings)")
    p.add_argument("--start", type=int, default=0, help="first training window of the batch")
    p.add_argument("--backward-solver", default=None, help="override the model's backward solver (auto, richardson, ...)")
    p.add_argument("--recompute-linearization", action=argparse.BooleanOptionalAction, default=None,
                   help="override the model's recompute_linearization (activation recomputation in the backward)")
    p.add_argument("--out", default=None, help="JSON file (default: print only)")
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = LMConfig(model=args.model, seq_len=args.seq_len, **({"d_model": args.d_model} if args.d_model else {}))
    state = None
    if args.checkpoint:
        from deqdiff.training.lm import LM_FORMAT
        from deqdiff.training.checkpoint import read_checkpoint

        ckpt = read_checkpoint(args.checkpoint, format=LM_FORMAT)
        cfg, state = LMConfig.from_dict(dict(ckpt["config"], out=None, progress=False)), ckpt["model"]
    if args.backward_solver:
        cfg = LMConfig.from_dict(dict(cfg.to_dict(), backward_solver=args.backward_solver))
    if args.recompute_linearization is not None:
        cfg = LMConfig.from_dict(dict(cfg.to_dict(), recompute_linearization=args.recompute_linearization))
    corpus = load_corpus()
    torch.manual_seed(cfg.seed)
    model = build_lm(cfg, corpus.vocab_size)
    if state is not None:
        model.load_state_dict(state)
    w = corpus.windows("train", cfg.seq_len)[args.start: args.start + args.batch].clone()
    warm = model(w[:1, :3])  # one-window warm-up: lazy imports and first-call setup
    F.cross_entropy(warm.reshape(-1, warm.shape[-1]), w[:1, 1:4].reshape(-1)).backward()
    model.zero_grad(set_to_none=True)

    mem = TracedMemory()
    phases = Phases(mem)
    if args.model == "deq":
        fp = importlib.import_module("deqdiff.engine.fixed_point")
        lin = importlib.import_module("deqdiff.engine.operators")
        phases.wrap(fp, "_forward_solve", "forward solve (no graph)")
        phases.wrap(lin._Pullback, "build", "linearization at z* (vjp graph of the cell, held)")
        phases.wrap(fp, "solve_with_operator", "implicit backward solve (incl. linearization)")
        phases.wrap(torch.func, "vjp", "torch.func.vjp calls (linearization, parameters' vjp)")
    import time

    t0 = time.perf_counter()
    with mem:
        with SavedTensors() as saved:
            logits = model(w[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1))
        forward_peak, after_forward = mem.peak, mem.current
        forward_where = list(mem.where)
        mem.reset_peak()
        mem._record = 0
        loss.backward()
        backward_peak = mem.peak
    seconds = time.perf_counter() - t0
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])
    result = {
        "command": " ".join(["python", "benchmarks/lm_memory_breakdown.py", *sys.argv[1:]]),
        "torch": torch.__version__, "model": args.model, "seq_len": args.seq_len, "batch": args.batch,
        "d_model": cfg.d_model, "dtype": cfg.dtype, "checkpoint": args.checkpoint, "start": args.start,
        "backward_solver": cfg.backward_solver, "recompute_linearization": cfg.recompute_linearization,
        "forward_peak_mib": forward_peak / MIB, "live_after_forward_mib": after_forward / MIB,
        "saved_for_backward_mib": saved.mib, "backward_peak_mib": backward_peak / MIB,
        "step_peak_mib": max(forward_peak, backward_peak) / MIB,
        "forward_peak_at": forward_where, "backward_peak_at": mem.where,
        "phases": phases.rows, "step_seconds_traced": seconds, "grad_norm": float(grads.norm()),
        "grad_head": grads[:8].tolist(),
    }
    if args.model == "deq":
        info = model.deq.last_info
        result["forward_iterations_mean"] = float(info.forward.iterations.double().mean())
        result["backward_iterations_mean"] = [float(d.iterations.double().mean()) for d in info.derivatives]
        result["backward_iterations_max"] = [int(d.iterations.max()) for d in info.derivatives if d.iterations.numel()]
        result["backward_solvers"] = [d.solver for d in info.derivatives]
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
