"""Training of character-level language models (``deqdiff lm``): the DEQ-Transformer and its
weight-tied unrolled counterpart, with bits per character, solver statistics, peak memory and
checkpoints that resume bit-exactly.

One optimizer step per global batch of windows (``seq_len`` + 1 characters): every rank computes
the gradient of (sum of its shard's next-character cross-entropies) / (global number of
predicted characters); gradients are summed over ranks (:class:`DistContext`), then Adam with
gradient clipping and a per-step cosine schedule. Bits per character = cross-entropy in nats / ln 2
over every predicted character of the split's non-overlapping windows, each window read without
memory of the previous one (so early positions see a short context).

Peak memory is the growth of the process's resident set during the training steps (``VmHWM``,
:func:`~deqdiff.training.memtrace.peak_rss_mib`, its high-water mark reset by
:func:`~deqdiff.training.memtrace.reset_peak_rss` before each epoch's steps, minus ``VmRSS``
after a one-window warm-up step): allocator and framework
overheads included, measured the same way for both models; compare models in separate
processes (the allocator keeps what a process once used). With ``trace_memory`` each step's
forward and backward also run under :class:`~deqdiff.training.memtrace.TensorMemory` (peak live
bytes of the tensors the step creates: the CPU counterpart of CUDA's ``max_memory_allocated``)
and the forward under :class:`~deqdiff.training.memtrace.SavedTensors` (bytes autograd saves
for backward while the forward records).
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import random
import re
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.text import CharCorpus, load_corpus
from ..solvers import ConvergenceWarning
from .checkpoint import read_checkpoint, rng_state, save_checkpoint, set_rng_state
from .distributed import DistContext
from .loop import ResumableRun, eval_shards, evaluating, train_epochs
from .memtrace import SavedTensors, TensorMemory, current_rss_mib, peak_rss_mib, reset_peak_rss

__all__ = ["LMConfig", "LMResult", "LM_FORMAT", "build_lm", "parse_model", "train_lm", "evaluate_bpc",
           "LM_RESUMABLE"]

LM_FORMAT = "deqdiff-lm-checkpoint/1"
LN2 = math.log(2.0)
#: settings a resumed run may change without breaking bit-exact continuation
LM_RESUMABLE = frozenset({"max_steps", "progress", "out", "checkpoint_every", "text", "trace_memory"})


@dataclass
class LMConfig:
    """Settings of :func:`train_lm`. Defaults: a 64-wide, 4-head DEQ-Transformer on 64-character
    windows of the ``help()`` topics, sized to train in CPU minutes (3 epochs of 64 steps)."""

    model: str = "deq"  # "deq" | "unrolled-L" (the cell applied L times, backpropagated)
    d_model: int = 64
    n_heads: int = 4
    d_ff: int = 128
    init_std: float = 0.1  # with lr 1e-3: solves stay at ~8 iterations (lr 3e-3 drove them to the 40 cap in 2 epochs)
    tie_weights: bool = True
    # data
    text: str | None = None  # a UTF-8 text file; None: the help() topics CPython ships
    seq_len: int = 64
    train_windows: int | None = 2048  # None: every training window; else this many, evenly spaced
    valid_windows: int | None = None  # evaluated after each epoch (None: all)
    # optimization
    epochs: int = 3
    batch_size: int = 32
    eval_batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    scheduler: str = "cosine"  # "cosine" | "none"
    # equilibrium solve (DEQ only)
    solver: str = "anderson"
    tol: float = 1e-3
    max_iter: int = 40
    # Anderson on the implicit backward: once trained, rows of this cell have ρ(∂f/∂z) > 1 (plain
    # Richardson diverges there) and "auto" hands them to GMRES, whose Krylov basis (21 states per
    # row) doubled the step's tensor memory late in training; Anderson (5 states of history) needed
    # 8 iterations where auto needed 31, with 0.65x the memory and half the time (epoch-2 weights,
    # benchmarks/results/lm.md)
    backward_solver: str = "anderson"
    backward_history: int = 3  # Anderson's memory m on the backward: 3 iterated as fast as 5 (7.9 vs 7.8) with 2 states less
    backward_tol: float | None = None
    backward_max_iter: int | None = None
    # activation recomputation in the implicit backward (fixed_point's recompute_linearization): the
    # backward solve holds no vjp graph of the cell; each of its iterations evaluates the cell again
    # (benchmarks/results/lm.md: less peak tensor memory for about one more cell evaluation per iteration)
    recompute_linearization: bool = True
    # run
    seed: int = 0
    dtype: str = "float32"
    out: str | None = None
    checkpoint_every: int = 0  # steps (0: at epoch ends only)
    max_steps: int | None = None
    progress: bool = True
    trace_memory: bool = False  # count each step's tensor memory (memtrace): peak live bytes, saved bytes

    def __post_init__(self):
        parse_model(self.model)
        for name in ("d_model", "n_heads", "d_ff", "seq_len", "epochs", "batch_size", "eval_batch_size", "max_iter",
                     "train_windows", "valid_windows", "backward_max_iter", "backward_history"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1):
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        for name in ("seed", "checkpoint_every", "max_steps"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0):
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
        for name, strict in (("lr", True), ("tol", True), ("backward_tol", True), ("grad_clip", True),
                             ("init_std", False), ("weight_decay", False)):
            v = getattr(self, name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0 or (strict and v == 0):
                raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} 0, got {v!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model must be divisible by n_heads ({self.d_model} % {self.n_heads} != 0)")
        if self.scheduler not in ("cosine", "none"):
            raise ValueError(f"scheduler must be 'cosine' or 'none', got {self.scheduler!r}")
        if not isinstance(self.recompute_linearization, bool):
            raise ValueError(f"recompute_linearization must be True or False, got {self.recompute_linearization!r}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LMConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def parse_model(name: str) -> int | None:
    """``"deq"`` → None; ``"unrolled-L"`` → L (≥ 1). ``ValueError`` otherwise."""
    if name == "deq":
        return None
    m = re.fullmatch(r"unrolled-(\d+)", str(name))
    if m is None or int(m.group(1)) < 1:
        raise ValueError(f"model must be 'deq' or 'unrolled-L' with L >= 1 (e.g. unrolled-8), got {name!r}")
    return int(m.group(1))


def build_lm(config: LMConfig, vocab_size: int) -> nn.Module:
    """The model of ``config`` (in ``config.dtype``) for a vocabulary of ``vocab_size``."""
    from ..models.transformer import DEQTransformerLM, UnrolledTransformerLM

    sizes = dict(d_model=config.d_model, n_heads=config.n_heads, d_ff=config.d_ff, max_len=config.seq_len,
                 init_std=config.init_std, tie_weights=config.tie_weights)
    depth = parse_model(config.model)
    # initialize in the run's dtype whatever the caller's default dtype is, so that a run (and
    # each data-parallel process) draws the same initial weights
    default = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, config.dtype))
    try:
        return _build(config, vocab_size, sizes, depth, DEQTransformerLM, UnrolledTransformerLM)
    finally:
        torch.set_default_dtype(default)


def _build(config, vocab_size, sizes, depth, DEQTransformerLM, UnrolledTransformerLM) -> nn.Module:
    if depth is None:
        model = DEQTransformerLM(vocab_size, **sizes, solver=config.solver, tol=config.tol, max_iter=config.max_iter,
                                 backward_solver=config.backward_solver, backward_tol=config.backward_tol,
                                 backward_max_iter=config.backward_max_iter,
                                 recompute_linearization=config.recompute_linearization,
                                 backward_options={"m": config.backward_history} if config.backward_solver == "anderson" else None)
    else:
        model = UnrolledTransformerLM(vocab_size, depth=depth, **sizes)
    return model.to(getattr(torch, config.dtype))


# --- evaluation ------------------------------------------------------------------------------------

class _Sums:
    """Per-step / per-epoch sums reducible over ranks: cross-entropy, characters, windows,
    forward iterations, unconverged rows; maxima of iterations and residuals."""

    SUMS = ("nats", "chars", "windows", "fwd_iter", "fwd_unconverged", "bwd_iter", "bwd_rows", "bwd_unconverged")
    MAXS = ("fwd_iter_max", "fwd_res_max", "bwd_iter_max", "bwd_res_max")

    def __init__(self):
        self.sums = torch.zeros(len(self.SUMS), dtype=torch.float64)
        self.maxs = torch.zeros(len(self.MAXS), dtype=torch.float64)

    def add(self, key: str, v: float) -> None:
        self.sums[self.SUMS.index(key)] += v

    def max(self, key: str, v: float) -> None:
        i = self.MAXS.index(key)
        self.maxs[i] = max(float(self.maxs[i]), v)

    def add_solves(self, model: nn.Module, backward: bool) -> None:
        info = getattr(getattr(model, "deq", None), "last_info", None)
        if info is None or info.forward is None:
            return
        f = info.forward
        self.add("fwd_iter", float(f.iterations.double().sum()))
        self.add("fwd_unconverged", float((~f.converged).sum()))
        self.max("fwd_iter_max", float(f.iterations.max()))
        self.max("fwd_res_max", float(f.rel_residual.max()))
        if backward:
            for d in info.derivatives:
                self.add("bwd_iter", float(d.iterations.double().sum()))
                self.add("bwd_rows", float(d.iterations.numel()))
                self.add("bwd_unconverged", float((~d.converged).sum()))
                self.max("bwd_iter_max", float(d.iterations.max()))
                self.max("bwd_res_max", float(d.rel_residual.max()))

    def merge(self, other: "_Sums") -> None:
        self.sums += other.sums
        self.maxs = torch.maximum(self.maxs, other.maxs)

    def reduce(self, ctx: DistContext) -> "_Sums":
        out = _Sums()
        out.sums, out.maxs = ctx.sum(self.sums.clone()), ctx.max(self.maxs.clone())
        return out

    def state(self) -> dict:
        return {"sums": self.sums.clone(), "maxs": self.maxs.clone()}

    @classmethod
    def from_state(cls, state: dict) -> "_Sums":
        s = cls()
        s.sums, s.maxs = state["sums"].clone(), state["maxs"].clone()
        return s

    def summary(self) -> dict:
        s, x = dict(zip(self.SUMS, self.sums.tolist())), dict(zip(self.MAXS, self.maxs.tolist()))
        chars = max(s["chars"], 1.0)
        out = {"loss": s["nats"] / chars, "bpc": s["nats"] / chars / LN2, "chars": int(s["chars"])}
        if s["fwd_iter"] or x["fwd_iter_max"]:
            w = max(s["windows"], 1.0)
            out.update(fwd_iter_mean=s["fwd_iter"] / w, fwd_iter_max=int(x["fwd_iter_max"]),
                       fwd_res_max=x["fwd_res_max"], fwd_unconverged=int(s["fwd_unconverged"]))
        if s["bwd_rows"]:
            out.update(bwd_iter_mean=s["bwd_iter"] / s["bwd_rows"], bwd_iter_max=int(x["bwd_iter_max"]),
                       bwd_res_max=x["bwd_res_max"], bwd_unconverged=int(s["bwd_unconverged"]))
        return out


def evaluate_bpc(model: nn.Module, windows: Tensor, *, batch_size: int = 64, ctx: DistContext | None = None,
                 **overrides) -> dict:
    """Bits per character of ``model`` on ``windows`` ``(n, T + 1)`` (inputs ``w[:, :-1]``,
    targets ``w[:, 1:]``), with the DEQ's solve statistics; sharded over the ranks of ``ctx``."""
    ctx = ctx or DistContext.current()
    sums = _Sums()
    with evaluating(model):
        for idx in eval_shards(windows.shape[0], batch_size, ctx):
            w = windows[idx]
            logits = model(w[:, :-1], **overrides)
            sums.add("nats", float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1),
                                                   reduction="sum")))
            sums.add("chars", w[:, 1:].numel())
            sums.add("windows", w.shape[0])
            sums.add_solves(model, backward=False)
    return sums.reduce(ctx).summary()


# --- training --------------------------------------------------------------------------------------

@dataclass
class LMResult:
    model: nn.Module
    config: LMConfig
    history: dict = field(default_factory=dict)  # {"epochs": [...], "steps": [...], "memory": {...}}
    steps: int = 0
    test: dict | None = None  # bpc on the test split after the last epoch

    @property
    def final(self) -> dict:
        return self.history["epochs"][-1] if self.history.get("epochs") else {}


def _train_windows(corpus: CharCorpus, config: LMConfig) -> Tensor:
    w = corpus.windows("train", config.seq_len)
    if config.train_windows is not None and config.train_windows < w.shape[0]:
        # evenly spaced over the split, so a small budget still samples every topic
        w = w[torch.linspace(0, w.shape[0] - 1, config.train_windows).round().long()]
    return w


def _valid_windows(corpus: CharCorpus, config: LMConfig, split: str = "valid") -> Tensor:
    w = corpus.windows(split, config.seq_len)
    n = config.valid_windows if split == "valid" else None
    if n is not None and n < w.shape[0]:
        w = w[torch.linspace(0, w.shape[0] - 1, n).round().long()]
    return w


def _digest(corpus: CharCorpus) -> str:
    """SHA-256 of the corpus's splits: a resumed run must read the same text (``text`` may move)."""
    h = hashlib.sha256()
    for split in (corpus.train, corpus.valid, corpus.test):
        h.update(split.numpy().tobytes())
    return h.hexdigest()


class _Run(ResumableRun):
    """The mutable state of one run (everything a checkpoint holds)."""

    meter_class, meter_key = _Sums, "sums"

    def __init__(self, config: LMConfig, corpus: CharCorpus, ctx: DistContext):
        self.config, self.corpus, self.ctx = config, corpus, ctx
        self.label = f"{config.model} "
        torch.manual_seed(config.seed)
        np.random.seed(config.seed)
        random.seed(config.seed)
        self.model = build_lm(config, corpus.vocab_size)
        ctx.broadcast_parameters(self.model)
        self.train = _train_windows(corpus, config)
        self.valid = _valid_windows(corpus, config)
        self.start(self.train.shape[0])
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        total = max(config.epochs * self.steps_per_epoch, 1)
        self.scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=total)
                          if config.scheduler == "cosine" else torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda _: 1.0))
        self.memory = None

    def state(self) -> dict:
        return {
            "config": self.config.to_dict(), "vocab": "".join(self.corpus.vocab), "corpus_sha256": _digest(self.corpus),
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "rng": rng_state(),
            **self.position_state(), "epoch_time": self.epoch_time,
        }

    def restore(self, state: dict) -> None:
        saved = LMConfig.from_dict(dict(state["config"]))
        changed = sorted(k for k, v in saved.to_dict().items() if getattr(self.config, k) != v and k not in LM_RESUMABLE)
        if changed:
            raise ValueError(f"cannot resume: settings {changed} differ from the checkpoint's "
                             f"({ {k: getattr(saved, k) for k in changed} }); only {sorted(LM_RESUMABLE)} may change")
        if state["vocab"] != "".join(self.corpus.vocab) or state.get("corpus_sha256", _digest(self.corpus)) != _digest(self.corpus):
            raise ValueError("cannot resume: the text differs from the one the checkpoint was trained on")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        self.restore_position(state)
        self.epoch_time = float(state["epoch_time"])

    def save(self) -> None:
        if self.config.out is None or not self.ctx.is_main:
            return
        out = Path(self.config.out)
        save_checkpoint(out / "checkpoint.pt", self.state(), format=LM_FORMAT)
        tmp = out / "metrics.json.tmp"
        tmp.write_text(json.dumps({"config": self.config.to_dict(), **self.history}, indent=1))
        tmp.replace(out / "metrics.json")

    # -- the loop's hooks (deqdiff.training.loop) ------------------------------------------------
    def step_record(self, lr: float, seconds: float, summary: dict) -> dict:
        return {"step": self.step, "epoch": self.epoch + 1, "lr": lr, "time_s": seconds, **summary, **(self.memory or {})}

    def begin_epoch(self) -> None:
        self.tracked = reset_peak_rss() and self.tracked  # the peak of training steps, not of evaluation

    def end_steps(self) -> None:
        self.peak = peak_rss_mib()
        if self.tracked:
            self.train_peak = max(self.train_peak, self.peak)

    def end_epoch(self) -> dict:
        valid = evaluate_bpc(self.model, self.valid, batch_size=self.config.eval_batch_size, ctx=self.ctx)
        return {"valid": valid, "peak_rss_above_start_mib": (self.peak - self.base) if self.tracked else None}

    def postfix(self, summary: dict) -> dict:
        return _postfix(summary)

    def epoch_line(self, record: dict) -> str:
        return _epoch_line(record)

    def train_step(self, global_size: int, idx: Tensor) -> _Sums:
        model, sums = self.model, _Sums()
        self.optimizer.zero_grad(set_to_none=True)
        self.memory = None
        if idx.numel():
            w = self.train[idx]
            trace = self.config.trace_memory
            mem, saved = (TensorMemory(), SavedTensors()) if trace else (None, None)
            with mem or nullcontext():
                with saved or nullcontext():
                    logits = model(w[:, :-1])
                    nats = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1),
                                           reduction="sum")
                (nats / (global_size * self.config.seq_len)).backward()
                del logits
            if trace:
                self.memory = {"tensor_peak_mib": mem.peak_mib, "saved_mib": saved.mib}
            sums.add("nats", float(nats.detach()))
            sums.add("chars", w[:, 1:].numel())
            sums.add("windows", w.shape[0])
            sums.add_solves(model, backward=True)
        self.optimizer_step()
        return sums


def _warm_up(model: nn.Module, train: Tensor) -> None:
    """One forward/backward on a single short window: loads what PyTorch loads lazily on the
    first step (e.g. sympy for the first ``grad_outputs``), so the memory measurement that
    follows sees training, not imports. Gradients are discarded."""
    w = train[:1, : min(3, train.shape[1])]
    logits = model(w[:, :-1])
    F.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1)).backward()
    model.zero_grad(set_to_none=True)


def _postfix(s: dict) -> dict:
    out = {"bpc": f"{s['bpc']:.3f}"}
    if "fwd_iter_mean" in s:
        out["it"] = f"{s['fwd_iter_mean']:.1f}/{s['fwd_iter_max']}"
    if "bwd_iter_max" in s:
        out["bwd"] = s["bwd_iter_max"]
    return out


def train_lm(config: LMConfig, corpus: CharCorpus | None = None, *, resume: bool | str | Path = False) -> LMResult:
    """Train ``config.model`` on ``corpus`` (default: :func:`~deqdiff.data.text.load_corpus` of
    ``config.text``); returns the model, the history and the test bpc.

    ``resume=True`` continues from ``config.out/checkpoint.pt`` if it exists; a path resumes
    from that checkpoint (``ValueError`` if its settings differ in anything but
    :data:`LM_RESUMABLE`). Under ``torch.distributed`` each rank trains on its shard of every
    global batch; rank 0 writes the files. Solves above tolerance are counted per step and epoch
    (``fwd_unconverged``, ``bwd_unconverged`` with the worst relative residuals) instead of
    warning at every step."""
    ctx = DistContext.current()
    if corpus is None:
        corpus = load_corpus(config.text)
    run = _Run(config, corpus, ctx)
    if resume:
        path = Path(config.out or ".") / "checkpoint.pt" if resume is True else Path(resume)
        if resume is not True or path.is_file():
            run.restore(read_checkpoint(path, format=LM_FORMAT))
    with warnings.catch_warnings():
        # solves above tolerance are counted per step and epoch (with their residuals) instead
        # of one warning per step
        warnings.simplefilter("ignore", ConvergenceWarning)
        return _train(run, config, corpus, ctx)


def _train(run: "_Run", config: LMConfig, corpus: CharCorpus, ctx: DistContext) -> LMResult:
    rng = rng_state()  # the warm-up must not move any random state
    _warm_up(run.model, run.train)
    set_rng_state(rng)
    run.base, run.tracked, run.train_peak = current_rss_mib(), reset_peak_rss(), 0.0
    train_epochs(run, run.save, show=config.progress and ctx.is_main)
    base, tracked, train_peak = run.base, run.tracked, run.train_peak
    run.history["memory"] = {
        "rss_start_mib": base, "peak_rss_mib": train_peak if tracked and train_peak else None,
        "peak_rss_above_start_mib": (train_peak - base) if tracked and train_peak else None,
        "method": ("max over this process's epochs of VmHWM during the training steps (reset before each epoch, "
                   "so evaluation is excluded) minus VmRSS after a one-window warm-up (/proc/self/status)")
        if tracked else "unavailable (no /proc/self/clear_refs)"}
    traced = [st for st in run.history["steps"] if "tensor_peak_mib" in st]
    if traced:
        run.history["memory"].update(
            tensor_peak_mib=max(st["tensor_peak_mib"] for st in traced), saved_mib=max(st["saved_mib"] for st in traced),
            traced_steps=len(traced),
            tensor_method=("max over the traced steps of the peak live bytes of the tensors each step's forward and "
                           "backward create (deqdiff.training.memtrace.TensorMemory); saved_mib: the storages autograd "
                           "saved while the forward recorded (SavedTensors), max over the steps"))
    test = None
    if run.epoch >= config.epochs:
        test = evaluate_bpc(run.model, _valid_windows(corpus, config, "test"), batch_size=config.eval_batch_size, ctx=ctx)
        run.history["test"] = test
    run.save()
    ctx.barrier()
    return LMResult(run.model, config, run.history, run.step, test)


def _epoch_line(r: dict) -> str:
    tr, va = r["train"], r["valid"]
    line = f"epoch {r['epoch']}: train bpc {tr['bpc']:.4f} | valid bpc {va['bpc']:.4f}"
    if "fwd_iter_mean" in tr:
        line += f" | fwd iters {tr['fwd_iter_mean']:.1f} (max {tr['fwd_iter_max']})"
        if tr["fwd_unconverged"]:
            line += f", {tr['fwd_unconverged']} unconverged (rel. residual up to {tr['fwd_res_max']:.1e})"
    if "bwd_iter_mean" in tr:
        line += f" | bwd iters {tr['bwd_iter_mean']:.1f} (max {tr['bwd_iter_max']})"
        if tr["bwd_unconverged"]:
            line += f", {tr['bwd_unconverged']} unconverged (rel. residual up to {tr['bwd_res_max']:.1e})"
    mem = r.get("peak_rss_above_start_mib")
    return line + (f" | peak RSS +{mem:.0f} MiB" if mem is not None else "") + f" | {r['time_s']:.1f}s"
