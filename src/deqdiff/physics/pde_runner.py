"""Training, evaluation and figures for any :class:`~deqdiff.physics.pde.PDEProblem`.

``train_pde`` runs full-batch Adam (cosine schedule to ``lr/50``) through the shared
:class:`~deqdiff.physics.training.Trainer` (exact checkpoint/resume; the collocation sampler's
state is stored with the checkpoint, so residual-based resampling resumes bit-identically).
``graph_bytes`` measures the memory a training step keeps for its backward pass (the distinct
tensors saved in the loss's autograd graph): the unrolled DEQ keeps every iteration, the
implicit one only the fixed point and the derivative solves.
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


def graph_bytes(loss: torch.Tensor) -> int:
    """Bytes of the distinct tensors the autograd graph of ``loss`` keeps for its backward pass
    (the ``_saved_*`` tensors of every node and custom functions' ``saved_tensors``, each
    storage counted once): the training memory a step needs beyond the weights."""
    seen: dict[int, int] = {}
    stack, visited = [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in visited:
            continue
        visited.add(id(node))
        tensors = []
        for name in dir(node):
            if name.startswith("_saved_"):
                try:
                    v = getattr(node, name)
                except RuntimeError:  # already freed
                    continue
                tensors += [v] if isinstance(v, torch.Tensor) else [t for t in v if isinstance(t, torch.Tensor)] \
                    if isinstance(v, (tuple, list)) else []
        try:
            tensors += [t for t in getattr(node, "saved_tensors", ()) if isinstance(t, torch.Tensor)]
        except RuntimeError:
            pass
        for t in tensors:
            try:
                st = t.untyped_storage()
                seen[st.data_ptr()] = st.nbytes()
            except (RuntimeError, NotImplementedError):
                seen[id(t)] = t.numel() * t.element_size()
        stack.extend(n for n, _ in node.next_functions)
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
        ax.set(title=name, xlabel=f"${problem.coords[1]}$", ylabel=f"${problem.coords[0]}$")
        fig.colorbar(im, ax=ax).set_label("$u$")
    im = axes[2].imshow(np.abs(ev["pred"] - ev["ref"]), origin="lower", extent=ext, aspect="auto", cmap="magma")
    axes[2].set(title=f"|error| (rel. L2 {ev['rel_l2']:.2e})", xlabel=f"${problem.coords[1]}$",
                ylabel=f"${problem.coords[0]}$")
    fig.colorbar(im, ax=axes[2]).set_label("$|u_{pred} - u_{ref}|$")
    fig.suptitle(title)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_history(histories: dict[str, list[dict]], path: Path, title: str) -> Path:
    """PDE-residual loss per epoch of each model (one line per model)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4), constrained_layout=True)
    from matplotlib.ticker import MaxNLocator

    for j, (name, hist) in enumerate(histories.items()):  # total wide and pale beneath its pde term
        steps = [h["step"] for h in hist]
        ax.semilogy(steps, [h["total"] for h in hist], color=f"C{j}", lw=3.5, alpha=0.35, label=f"{name}: total")
        ax.semilogy(steps, [h["pde"] for h in hist], color=f"C{j}", ls="--", lw=1.2, label=f"{name}: pde")
    ax.set(xlabel="epoch", ylabel="loss (mean square)", title=title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.legend(*ax.get_legend_handles_labels(), loc="outside right upper", fontsize=7)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def epoch_time(history: list[dict], skip: int = 5) -> float:
    """Median wall time of an Adam step (the first ``skip`` steps warm up caches)."""
    t = [h["time"] for h in history if h.get("phase") == "adam"][skip:] or [h["time"] for h in history]
    return float(np.median(t)) if t else math.nan
