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
reported too. ``--live-at-peak K`` lists the live tensors at the backward peak by where they were
created (the K largest groups); ``--replay-steps 76,174`` trains the default run in this process
and measures those steps' batches with the weights they meet::

    OMP_NUM_THREADS=1 python benchmarks/lm_memory_breakdown.py --replay-steps 2,76,174 --live-at-peak 12
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
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


def _frames(depth: int) -> list[str]:
    """The innermost ``depth`` frames of deqdiff (and torch.nn) code on the stack, innermost last."""
    keep = (f"{os.sep}deqdiff{os.sep}", f"{os.sep}torch{os.sep}nn{os.sep}")
    return [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in traceback.extract_stack()
            if any(k in f.filename for k in keep) and "memtrace" not in f.filename][-depth:]


class TracedMemory(TensorMemory):
    """TensorMemory that also records the innermost ``deqdiff`` frames each time the peak rises and,
    with ``sites``, where each live storage was created, so that the live tensors at the peak can be
    listed by creation site (:meth:`live_at_peak`)."""

    def __init__(self, sites: bool = False):
        super().__init__()
        self.where: list[str] = []
        self._record = 0
        self.sites = sites
        self._site: dict[int, tuple[str, tuple]] = {}
        self._snapshot: list[tuple[int, str, tuple]] = []

    def _track(self, t):
        before = self.peak
        super()._track(t)
        if self.sites:
            try:
                key = t.untyped_storage().data_ptr()
            except (RuntimeError, NotImplementedError):
                key = 0
            if key and key in self._live and key not in self._site:
                self._site[key] = (" < ".join(reversed(_frames(4))), tuple(t.shape))
        if self.peak > before and self.peak > self._record:
            self._record = self.peak
            self.where = _frames(6)
            if self.sites:
                self._snapshot = [(n, *self._site.get(k, ("(created before)", ()))) for k, (n, _) in self._live.items()]

    def _freed(self, key, ref):
        super()._freed(key, ref)
        if key not in self._live:
            self._site.pop(key, None)

    def live_at_peak(self, top: int) -> list[dict]:
        """The ``top`` largest groups (creation site, shape) of the storages live at the last peak."""
        groups: dict[tuple, list] = {}
        for n, site, shape in self._snapshot:
            g = groups.setdefault((site, shape), [0, 0])
            g[0] += n
            g[1] += 1
        rows = sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]
        return [{"mib": n / MIB, "count": c, "shape": list(shape), "created_at": site} for (site, shape), (n, c) in rows]


def measure(model, w, phases: Phases | None, live_top: int) -> dict:
    """One forward + backward of ``model`` on windows ``w`` (inputs ``w[:, :-1]``) under a fresh
    :class:`TracedMemory`: peaks, saved bytes, phases, where the peaks were and (``live_top`` > 0)
    the live tensors at the backward peak by creation site."""
    mem = TracedMemory(sites=live_top > 0)
    if phases is not None:
        phases.mem, phases.rows = mem, []
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
        "forward_peak_mib": forward_peak / MIB, "live_after_forward_mib": after_forward / MIB,
        "saved_for_backward_mib": saved.mib, "backward_peak_mib": backward_peak / MIB,
        "step_peak_mib": max(forward_peak, backward_peak) / MIB,
        "forward_peak_at": forward_where, "backward_peak_at": mem.where,
        "phases": [] if phases is None else phases.rows, "step_seconds_traced": seconds,
        "grad_norm": float(grads.norm()), "grad_head": grads[:8].tolist(),
    }
    if live_top:
        result["live_at_backward_peak"] = mem.live_at_peak(live_top)
    info = getattr(getattr(model, "deq", None), "last_info", None)
    if info is not None:
        result["forward_iterations_mean"] = float(info.forward.iterations.double().mean())
        result["forward_iterations_max"] = int(info.forward.iterations.max())
        result["backward_iterations_mean"] = [float(d.iterations.double().mean()) for d in info.derivatives]
        result["backward_iterations_max"] = [int(d.iterations.max()) for d in info.derivatives if d.iterations.numel()]
        result["backward_solvers"] = [d.solver for d in info.derivatives]
    model.zero_grad(set_to_none=True)
    return result


def replay(cfg: LMConfig, steps: set[int], phases: Phases | None, live_top: int) -> list[dict]:
    """Train ``cfg`` (``deqdiff lm`` with these settings) in this process and, just before each
    step in ``steps``, measure that step's batch with the weights it meets (gradients discarded;
    the training itself is unchanged); stops after the last one."""
    import deqdiff.training.lm as lm

    out: list[dict] = []
    original = lm._Run.train_step

    class Done(Exception):
        pass

    def train_step(run, global_size, idx):
        if run.step + 1 in steps:
            out.append({"step": run.step + 1, **measure(run.model, run.train[idx], phases, live_top)})
            print(json.dumps({k: out[-1].get(k) for k in ("step", "forward_peak_mib", "backward_peak_mib",
                                                          "backward_iterations_max")}), flush=True)
            if run.step + 1 == max(steps):
                raise Done
        return original(run, global_size, idx)

    lm._Run.train_step = train_step
    try:
        lm.train_lm(cfg)
    except Done:
        pass
    finally:
        lm._Run.train_step = original
    return out


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
    p.add_argument("--live-at-peak", type=int, default=0, metavar="K",
                   help="also list the K largest groups of live tensors at the backward peak, by creation site")
    p.add_argument("--replay-steps", default=None, metavar="S1,S2,...",
                   help="train the default `deqdiff lm` run (--model, --batch-size 32, ...) and measure these "
                        "steps' batches with the weights they meet (ignores --seq-len, --batch, --start, --checkpoint)")
    p.add_argument("--out", default=None, help="JSON file (default: print only)")
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.live_at_peak < 0:
        p.error(f"--live-at-peak must be >= 0, got {args.live_at_peak}")
    steps = None
    if args.replay_steps:
        try:
            steps = {int(x) for x in args.replay_steps.split(",")}
        except ValueError:
            p.error(f"--replay-steps: comma-separated step numbers expected, got {args.replay_steps!r}")
        if min(steps) < 1:
            p.error(f"--replay-steps: steps count from 1, got {args.replay_steps!r}")
    cfg = LMConfig(model=args.model, seq_len=args.seq_len, **({"d_model": args.d_model} if args.d_model else {}))
    state = None
    if args.checkpoint and steps is None:
        from deqdiff.training.lm import LM_FORMAT
        from deqdiff.training.checkpoint import read_checkpoint

        ckpt = read_checkpoint(args.checkpoint, format=LM_FORMAT)
        cfg, state = LMConfig.from_dict(dict(ckpt["config"], out=None, progress=False)), ckpt["model"]
    if steps is not None:
        cfg = LMConfig(model=args.model, progress=False)
    if args.backward_solver:
        cfg = LMConfig.from_dict(dict(cfg.to_dict(), backward_solver=args.backward_solver))
    if args.recompute_linearization is not None:
        cfg = LMConfig.from_dict(dict(cfg.to_dict(), recompute_linearization=args.recompute_linearization))

    phases = None
    if cfg.model == "deq":
        phases = Phases(TracedMemory())
        fp = importlib.import_module("deqdiff.engine.fixed_point")
        lin = importlib.import_module("deqdiff.engine.operators")
        phases.wrap(fp, "_forward_solve", "forward solve (no graph)")
        phases.wrap(lin._Pullback, "build", "linearization at z* (vjp graph of the cell, held)")
        phases.wrap(fp, "solve_with_operator", "implicit backward solve (incl. linearization)")
        phases.wrap(torch.func, "vjp", "torch.func.vjp calls (linearization, parameters' vjp)")
    result = {
        "command": " ".join(["python", "benchmarks/lm_memory_breakdown.py", *sys.argv[1:]]),
        "torch": torch.__version__, "model": cfg.model, "seq_len": cfg.seq_len, "d_model": cfg.d_model,
        "dtype": cfg.dtype, "backward_solver": cfg.backward_solver,
        "recompute_linearization": cfg.recompute_linearization,
    }
    if steps is not None:
        result.update(batch=cfg.batch_size, replayed_steps=replay(cfg, steps, phases, args.live_at_peak))
    else:
        corpus = load_corpus()
        torch.manual_seed(cfg.seed)
        model = build_lm(cfg, corpus.vocab_size)
        if state is not None:
            model.load_state_dict(state)
        w = corpus.windows("train", cfg.seq_len)[args.start: args.start + args.batch].clone()
        warm = model(w[:1, :3])  # one-window warm-up: lazy imports and first-call setup
        F.cross_entropy(warm.reshape(-1, warm.shape[-1]), w[:1, 1:4].reshape(-1)).backward()
        model.zero_grad(set_to_none=True)
        result.update(batch=args.batch, checkpoint=args.checkpoint, start=args.start,
                      **measure(model, w, phases, args.live_at_peak))
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
