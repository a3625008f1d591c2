"""Training, evaluation and figures for any :class:`~deqdiff.physics.pde.PDEProblem`.

``train_pde`` runs full-batch Adam (cosine schedule to ``lr/50``) through the shared
:class:`~deqdiff.physics.training.Trainer` (exact checkpoint/resume; the collocation sampler's
state is stored with the checkpoint, so residual-based resampling resumes bit-identically).
``graph_bytes`` measures the memory a training step keeps for its backward pass (bytes of the
distinct tensors autograd saves, via ``torch.autograd.graph.saved_tensors_hooks``): the unrolled
DEQ keeps every iteration, the implicit one only the fixed point and the derivative solves.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .pde import PDEProblem
from .training import Phase, Trainer

__all__ = ["make_trainer", "train_pde", "evaluate_pde", "graph_bytes", "plot_solution", "plot_history"]


def make_trainer(problem: PDEProblem, model: nn.Module, *, epochs: int, lr: float = 1e-2, seed: int = 0,
                 lr_final_ratio: float = 1 / 50, lbfgs_steps: int = 0) -> Trainer:
    """A :class:`Trainer` with an Adam phase of ``epochs`` steps (cosine to ``lr·lr_final_ratio``)
    and optionally ``lbfgs_steps`` L-BFGS steps; one fresh batch per step from ``problem.sample``."""
    if epochs < 0 or lbfgs_steps < 0 or not lr > 0:
        raise ValueError(f"need epochs ≥ 0, lbfgs_steps ≥ 0 and lr > 0, got {epochs}, {lbfgs_steps}, {lr}")
    phases = [Phase("adam", epochs, lambda ps: torch.optim.Adam(ps, lr=lr),
                    lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1),
                                                                           eta_min=lr * lr_final_ratio))]
    if lbfgs_steps:
        phases.append(Phase("lbfgs", lbfgs_steps, lambda ps: torch.optim.LBFGS(
            ps, lr=1.0, max_iter=20, history_size=50, line_search_fn="strong_wolfe")))
    return Trainer(model, problem.loss, lambda g, step: problem.sample(g, step, model), phases, seed=seed)


def train_pde(problem: PDEProblem, model: nn.Module, *, epochs: int, lr: float = 1e-2, seed: int = 0,
              lbfgs_steps: int = 0, progress: bool = False, desc: str = "pinn", checkpoint: str | Path | None = None,
              checkpoint_every: int = 0, resume: str | Path | None = None, extra: dict | None = None) -> Trainer:
    """Train ``model`` on ``problem``; with ``resume`` continue from that checkpoint bit-identically.
    A checkpoint holds the trainer's state, the sampler's state and ``extra`` (e.g. the config)."""
    trainer = make_trainer(problem, model, epochs=epochs, lr=lr, seed=seed, lbfgs_steps=lbfgs_steps)
    if resume is not None:
        state = trainer.load(resume)
        problem.load_state_dict(state["problem"])
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=trainer.total_steps, initial=trainer.step_count, desc=desc, dynamic_ncols=True)
    try:
        while not trainer.done:
            rec = trainer.step()
            if bar is not None:
                post = {"loss": f"{rec['total']:.2e}", "pde": f"{rec['pde']:.1e}"}
                if "iters_max" in rec:
                    post["it"] = int(rec["iters_max"])
                bar.set_postfix(post, refresh=False)
                bar.update(1)
            if checkpoint is not None and checkpoint_every and trainer.step_count % checkpoint_every == 0:
                trainer.save(checkpoint, {**(extra or {}), "problem": problem.state_dict()})
    finally:
        if bar is not None:
            bar.close()
    if checkpoint is not None:
        trainer.save(checkpoint, {**(extra or {}), "problem": problem.state_dict()})
    return trainer


def graph_bytes(problem: PDEProblem, model: nn.Module, batch: dict) -> int:
    """Bytes of the distinct tensors autograd saves while computing one step's loss (what the
    backward pass keeps alive), measured with ``saved_tensors_hooks``."""
    seen: dict[tuple, int] = {}

    def pack(t: torch.Tensor):
        try:
            s = t.untyped_storage()
            seen[(s.data_ptr(), t.device.type)] = s.nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. functorch wrappers)
            seen[(id(t), "x")] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = problem.loss(model, batch)
    del out
    return int(sum(seen.values()))


def evaluate_pde(problem: PDEProblem, model: nn.Module, sizes: Sequence[int], chunk: int = 20000) -> dict:
    """Prediction and ``problem.reference`` on a uniform grid: relative L2 and max error."""
    if problem.reference is None:
        raise ValueError(f"problem {problem.name!r} has no reference solution")
    axes, X = problem.domain.grid(sizes)
    ref = np.asarray(problem.reference(X), dtype=np.float64).reshape(X.shape[0], -1)
    p = next(model.parameters())
    preds = []
    with torch.no_grad():
        for i in range(0, X.shape[0], chunk):
            xb = torch.as_tensor(X[i:i + chunk], dtype=p.dtype, device=p.device)
            preds.append(model(xb, on_fail="ignore") if getattr(model, "deq", None) is not None else model(xb))
    pred = torch.cat(preds).double().cpu().numpy().reshape(ref.shape)
    err = pred - ref
    shape = tuple(int(s) for s in sizes)
    return {"axes": axes, "pred": pred[:, 0].reshape(shape), "ref": ref[:, 0].reshape(shape),
            "rel_l2": float(np.linalg.norm(err) / max(np.linalg.norm(ref), 1e-300)),
            "max_abs": float(np.abs(err).max())}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_solution(problem: PDEProblem, ev: dict, path: Path, title: str) -> Path:
    """Prediction, reference and |error| over a 2-D domain (first two coordinates)."""
    plt = _plt()
    (a0, a1) = ev["axes"][:2]
    ext = [a1[0], a1[-1], a0[0], a0[-1]]
    lim = float(np.abs(ev["ref"]).max())
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8), constrained_layout=True)
    for ax, key, name in ((axes[0], "pred", "prediction"), (axes[1], "ref", "reference")):
        im = ax.imshow(ev[key], origin="lower", extent=ext, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.set(title=name, xlabel=problem.coords[1], ylabel=problem.coords[0])
        fig.colorbar(im, ax=ax)
    im = axes[2].imshow(np.abs(ev["pred"] - ev["ref"]), origin="lower", extent=ext, aspect="auto", cmap="magma")
    axes[2].set(title=f"|error| (rel. L2 {ev['rel_l2']:.2e})", xlabel=problem.coords[1], ylabel=problem.coords[0])
    fig.colorbar(im, ax=axes[2])
    fig.suptitle(title)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_history(histories: dict[str, list[dict]], path: Path, title: str) -> Path:
    """PDE-residual loss per epoch of each model (one line per model)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4), constrained_layout=True)
    for name, hist in histories.items():
        steps = [h["step"] for h in hist]
        ax.semilogy(steps, [h["total"] for h in hist], label=f"{name}: total")
        ax.semilogy(steps, [h["pde"] for h in hist], "--", lw=0.8, label=f"{name}: pde")
    ax.set(xlabel="epoch", ylabel="loss", title=title)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def epoch_time(history: list[dict], skip: int = 5) -> float:
    """Median wall time of an Adam step (the first ``skip`` steps warm up caches)."""
    t = [h["time"] for h in history if h.get("phase") == "adam"][skip:] or [h["time"] for h in history]
    return float(np.median(t)) if t else math.nan
