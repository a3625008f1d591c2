"""Training and evaluation of steady-state neural operators on Darcy flow (``deqdiff operator darcy``).

One run trains the FNO-DEQ (Marwah et al. 2023) and the explicit FNO with the same lift, cell and
projection (:mod:`deqdiff.models.fno`) on the same generated data (:mod:`deqdiff.physics.darcy`),
in the same data order and from the same initial weights (the weight-tied explicit FNO starts
from exactly the DEQ's parameters), then reports for each:

* relative L2 error on held-out fields, mean over samples of ‖u_pred − u‖₂/‖u‖₂ (the metric of
  Li et al. 2021), also the training loss;
* robustness to noisy inputs: the held-out error when each coefficient field is perturbed by
  pointwise Gaussian noise of standard deviation ε·rms(a) (ε the relative sizes given), measured
  against the clean solution (as the noisy-input study of Marwah et al. 2023, §5);
* seconds per epoch, forward/derivative solver iterations (DEQ), solves that ended above
  tolerance with their worst residual, and memory: the bytes autograd saves for the backward
  pass of one training batch (activations) and the process's peak resident memory.

Training: Adam, cosine-annealed learning rate stepped per batch, loss = mean relative L2
(Li et al. 2021), mini-batches in a seeded order. Checkpoints at epoch boundaries (and at the
end of each model's training) hold everything the next epoch depends on; resuming gives the
bit-identical final result.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..models.fno import FNODEQ, FNOExplicit, count_parameters
from ..training.checkpoint import read_checkpoint, rng_state, save_checkpoint, set_rng_state
from .darcy import DarcyData, DarcySettings, load_or_generate

__all__ = ["OPERATOR_FORMAT", "OperatorConfig", "build_model", "relative_l2", "train_model", "evaluate",
           "noise_robustness", "saved_activation_bytes", "resume_state", "run"]

OPERATOR_FORMAT = "deqdiff-operator-checkpoint/1"
MODELS = ("deq", "explicit")


@dataclass
class OperatorConfig:
    """Settings of a run. Data: ``n_train`` + ``n_test`` fields at ``resolution`` nodes per side.
    Model: ``width`` channels, ``modes`` Fourier modes, ``projection`` hidden channels of Q; the
    explicit FNO applies the cell ``k`` times (``explicit="tied"``: one shared cell, parameters
    equal to the DEQ's; ``"untied"``: k cells). DEQ: forward ``solver``, relative ``tol``,
    ``max_iter``. ``noise``: relative noise sizes ε of the robustness study."""

    problem: str = "darcy"
    n_train: int = 500
    n_test: int = 100
    resolution: int = 32
    width: int = 16
    modes: int = 8
    projection: int = 64
    k: int = 6
    explicit: str = "tied"
    epochs: int = 12
    batch: int = 10
    lr: float = 3e-3
    weight_decay: float = 1e-4
    solver: str = "anderson"
    tol: float = 1e-3
    max_iter: int = 40
    noise: list = field(default_factory=lambda: [0.0, 0.05, 0.1, 0.2, 0.4])
    models: list = field(default_factory=lambda: list(MODELS))
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"

    def validate(self) -> "OperatorConfig":
        """Raises ``ValueError`` whose message starts with the setting's name."""
        if self.problem != "darcy":
            raise ValueError(f"problem {self.problem!r} is not known; choose darcy")
        for name in ("n_train", "n_test", "resolution", "width", "modes", "projection", "k", "epochs", "batch", "max_iter"):
            v = getattr(self, name)
            if isinstance(v, bool) or int(v) != v or v < 1:
                raise ValueError(f"{name} must be an integer ≥ 1, got {v}")
        if self.resolution < 4:
            raise ValueError(f"resolution must be ≥ 4 nodes per side, got {self.resolution}")
        if 2 * self.modes > self.resolution:
            raise ValueError(f"modes {self.modes} do not fit {self.resolution} nodes per side (need 2·modes ≤ resolution)")
        if self.batch > self.n_train:
            raise ValueError(f"batch {self.batch} exceeds the training set (n_train {self.n_train})")
        for name in ("lr", "tol"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {v}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a finite number ≥ 0, got {self.weight_decay}")
        if self.explicit not in ("tied", "untied"):
            raise ValueError(f"explicit must be 'tied' or 'untied', got {self.explicit!r}")
        if not self.noise or any(not (math.isfinite(e) and e >= 0) for e in self.noise):
            raise ValueError(f"noise must be finite relative sizes ≥ 0, got {self.noise}")
        bad = [m for m in self.models if m not in MODELS]
        if bad or not self.models or len(set(self.models)) != len(self.models):
            raise ValueError(f"models must be distinct names among {', '.join(MODELS)}, got {self.models}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype!r}")
        if not 0 <= self.seed < 2 ** 32:
            raise ValueError(f"seed must be in 0..2**32-1, got {self.seed}")
        return self

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def data_settings(self) -> DarcySettings:
        return DarcySettings(n_samples=self.n_train + self.n_test, resolution=self.resolution, seed=self.seed)


#: settings a resumed run may change: they only affect the evaluation or the device
EVALUATION_ONLY = frozenset({"noise", "device"})


def build_model(cfg: OperatorConfig, name: str) -> nn.Module:
    """The untrained model ``name`` ("deq" or "explicit"), initialized from ``cfg.seed`` (the two
    models draw the same lift, cell and projection weights) without touching the global RNG."""
    common = dict(width=cfg.width, modes=cfg.modes, projection=cfg.projection)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        if name == "deq":
            # solves above tolerance are counted and reported by the trainer, with their residual
            model = FNODEQ(cfg.resolution, solver=cfg.solver, tol=cfg.tol, max_iter=cfg.max_iter, on_fail="ignore", **common)
        elif name == "explicit":
            model = FNOExplicit(cfg.resolution, k=cfg.k, tied=cfg.explicit == "tied", **common)
        else:
            raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return model.to(device=cfg.device, dtype=cfg.torch_dtype)


def relative_l2(pred: Tensor, true: Tensor) -> Tensor:
    """Per-sample ‖pred − true‖₂/‖true‖₂ over all grid nodes, shape ``(B,)``."""
    diff = (pred - true).flatten(1).norm(dim=1)
    return diff / true.flatten(1).norm(dim=1)


class SolveStats:
    """Forward and derivative solve statistics of the DEQ over an epoch (never silent about
    solves that ended above tolerance: their count and worst relative residual are kept)."""

    def __init__(self):
        self.fwd: list[float] = []
        self.bwd: list[float] = []
        self.failed_fwd = self.failed_bwd = 0
        self.worst_fwd = self.worst_bwd = 0.0

    def add(self, info) -> None:
        if info is None or info.forward is None:
            return
        f = info.forward
        self.fwd.append(float(f.iterations.float().mean()))
        if not f.all_converged:
            self.failed_fwd += int((~f.converged).sum())
            self.worst_fwd = max(self.worst_fwd, float(f.rel_residual[~f.converged].max()))
        for d in info.derivatives:
            self.bwd.append(float(d.iterations.float().mean()))
            if not d.all_converged:
                self.failed_bwd += int((~d.converged).sum())
                self.worst_bwd = max(self.worst_bwd, float(d.rel_residual[~d.converged].max()))

    def summary(self) -> dict:
        mean = lambda v: float(np.mean(v)) if v else None  # noqa: E731
        return {"forward_iters_mean": mean(self.fwd), "forward_iters_max": max(self.fwd) if self.fwd else None,
                "backward_iters_mean": mean(self.bwd), "unconverged_forward_rows": self.failed_fwd,
                "worst_forward_rel_residual": self.worst_fwd, "unconverged_backward_rows": self.failed_bwd,
                "worst_backward_rel_residual": self.worst_bwd}


def _tensors(data: DarcyData, cfg: OperatorConfig) -> dict[str, Tensor]:
    t = lambda x: torch.as_tensor(x, dtype=cfg.torch_dtype, device=cfg.device)  # noqa: E731
    n = cfg.n_train
    return {"a_train": t(data.a[:n]), "u_train": t(data.u[:n]), "a_test": t(data.a[n:]), "u_test": t(data.u[n:])}


def _setup(cfg: OperatorConfig, name: str, data: dict[str, Tensor]):
    model = build_model(cfg, name)
    model.set_normalization(data["a_train"], data["u_train"])
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = cfg.epochs * math.ceil(cfg.n_train / cfg.batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    gen = torch.Generator().manual_seed(cfg.seed + 1)  # data order, the same for every model
    return model, opt, sched, gen


@torch.no_grad()
def predict(model: nn.Module, a: Tensor, batch: int = 50, stats: SolveStats | None = None) -> Tensor:
    out = []
    for i in range(0, a.shape[0], batch):
        out.append(model(a[i:i + batch]))
        if stats is not None:
            stats.add(getattr(getattr(model, "deq", None), "last_info", None))
    return torch.cat(out)


def evaluate(model: nn.Module, a: Tensor, u: Tensor) -> dict:
    """Mean and max relative L2 error on ``(a, u)`` and the DEQ's solve statistics."""
    stats = SolveStats()
    model.eval()
    err = relative_l2(predict(model, a, stats=stats), u)
    return {"rel_l2": float(err.mean()), "rel_l2_max": float(err.max()), **stats.summary()}


def noise_robustness(model: nn.Module, a: Tensor, u: Tensor, levels: list[float], seed: int) -> list[dict]:
    """Held-out error for inputs ``a + ε·rms(a)·ξ`` (ξ ~ N(0, 1) pointwise, one draw per level
    from ``seed``: the same noise for every model) against the clean solutions ``u``."""
    rows = []
    rms = a.flatten(1).square().mean(1).sqrt()[:, None, None]
    for j, eps in enumerate(levels):
        g = torch.Generator(device="cpu").manual_seed(seed + 7919 * (j + 1))
        xi = torch.randn(a.shape, generator=g, dtype=a.dtype).to(a.device)
        rows.append({"noise": float(eps), **evaluate(model, a + eps * rms * xi, u)})
    return rows


def saved_activation_bytes(model: nn.Module, a: Tensor, u: Tensor) -> int:
    """Bytes autograd keeps for the backward pass of one training batch (distinct storages of
    the tensors saved by every node): the activation memory that unrolling multiplies by k and
    the implicit DEQ does not."""
    seen: dict[tuple, int] = {}

    def pack(t: Tensor):
        try:
            storage = t.untyped_storage()
            seen[(storage.data_ptr(), t.device.type)] = storage.nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. wrappers)
            pass
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = relative_l2(model(a), u).mean()
    del loss
    params = {(p.untyped_storage().data_ptr(), p.device.type) for p in model.parameters()}
    params |= {(b.untyped_storage().data_ptr(), b.device.type) for b in model.buffers()}
    return int(sum(n for key, n in seen.items() if key not in params))


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (MiB): ``VmHWM`` where ``/proc`` has it
    (``ru_maxrss`` survives ``exec``, so a fresh worker would report its parent's peak)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 1024


def train_model(cfg: OperatorConfig, name: str, data: dict[str, Tensor], *, state: dict | None = None,
                progress: bool = False, checkpoint=None, checkpoint_every: int = 0, until: int | None = None):
    """Train model ``name`` for ``cfg.epochs`` epochs (from ``state``, the ``current`` part of a
    checkpoint, when given). ``checkpoint(epoch, parts)`` is called every ``checkpoint_every``
    epochs; ``until`` stops early after that epoch (for tests of resuming).
    Returns ``(model, parts)``; ``parts`` holds what a checkpoint of this phase needs."""
    model, opt, sched, gen = _setup(cfg, name, data)
    history: dict[str, list] = {"epoch": [], "train_loss": [], "test_rel_l2": [], "epoch_time_s": [],
                                "forward_iters_mean": [], "backward_iters_mean": [], "unconverged_forward_rows": [],
                                "unconverged_backward_rows": []}
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        history, start = state["history"], int(state["epoch"])
    stop = cfg.epochs if until is None else min(until, cfg.epochs)
    epochs = range(start, stop)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(epochs, desc=f"operator darcy: {name}", initial=start, total=cfg.epochs, dynamic_ncols=True)
        epochs = bar
    a_train, u_train = data["a_train"], data["u_train"]
    parts = lambda epoch: {"model": model.state_dict(), "optimizer": opt.state_dict(),  # noqa: E731
                           "scheduler": sched.state_dict(), "generator": gen.get_state(), "history": history,
                           "epoch": epoch}
    for epoch in epochs:
        model.train()
        stats = SolveStats()
        t0 = time.perf_counter()
        order = torch.randperm(cfg.n_train, generator=gen)
        total = 0.0
        for i in range(0, cfg.n_train, cfg.batch):
            idx = order[i:i + cfg.batch].to(a_train.device)
            opt.zero_grad(set_to_none=True)
            loss = relative_l2(model(a_train[idx]), u_train[idx]).mean()
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{name}: the loss became {float(loss)} in epoch {epoch}; lower --lr")
            loss.backward()
            opt.step()
            sched.step()
            stats.add(getattr(getattr(model, "deq", None), "last_info", None))
            total += float(loss.detach()) * idx.numel()
        seconds = time.perf_counter() - t0
        test = evaluate(model, data["a_test"], data["u_test"])
        s = stats.summary()
        history["epoch"].append(epoch + 1)
        history["train_loss"].append(total / cfg.n_train)
        history["test_rel_l2"].append(test["rel_l2"])
        history["epoch_time_s"].append(seconds)
        for key in ("forward_iters_mean", "backward_iters_mean", "unconverged_forward_rows", "unconverged_backward_rows"):
            history[key].append(s[key])
        if bar is not None:
            post = {"loss": f"{total / cfg.n_train:.3e}", "test": f"{test['rel_l2']:.3e}"}
            if s["forward_iters_mean"] is not None:
                post["it"] = f"{s['forward_iters_mean']:.1f}"
            bar.set_postfix(post)
        if checkpoint is not None and checkpoint_every and (epoch + 1) % checkpoint_every == 0 and epoch + 1 < cfg.epochs:
            checkpoint(parts(epoch + 1))
    if bar is not None:
        bar.close()
    return model, parts(max(stop, start))


def resume_state(cfg: OperatorConfig, path: str | Path) -> dict:
    """The checkpoint at ``path`` checked against ``cfg``: ``ValueError`` naming the flag of a
    setting that differs (only evaluation settings may change)."""
    try:
        state = read_checkpoint(path, format=OPERATOR_FORMAT)
    except ValueError as err:
        raise ValueError(f"--resume: {err}") from None
    saved, now = state["config"], asdict(cfg)
    changed = [k for k, v in now.items() if k not in EVALUATION_ONLY and _plain(saved.get(k)) != _plain(v)]
    if changed:
        what = ", ".join(f"{flag(k)} {_plain(now[k])} (checkpoint: {_plain(saved.get(k))})" for k in changed)
        raise ValueError(f"--resume: {what} differ from the checkpoint's run; resume with its settings")
    return state


def _plain(v):
    return list(v) if isinstance(v, (list, tuple)) else v


_FLAGS = {"n_train": "--n-train", "n_test": "--n-test", "weight_decay": "--weight-decay", "max_iter": "--max-iter"}


def flag(name: str) -> str:
    """The command-line flag of config field ``name``."""
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


def run(cfg: OperatorConfig, out: str | Path, *, state: dict | None = None, progress: bool = True,
        plots: bool = True, cache: bool = False, checkpoint_every: int = 1, until: tuple[str, int] | None = None) -> dict:
    """Generate (or read the cached) data, train every model of ``cfg.models`` in turn, evaluate,
    write ``results.json``, figures and ``checkpoint.pt`` into ``out``. ``state``: a checkpoint
    to resume from. ``until=(name, epoch)`` stops after that model's epoch (tests of resuming).
    Returns the results dict."""
    cfg.validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "checkpoint.pt"
    t_data = time.perf_counter()
    darcy = load_or_generate(out / "darcy_data.npz" if cache else None, cfg.data_settings(), progress=progress)
    t_data = time.perf_counter() - t_data
    data = _tensors(darcy, cfg)
    done: dict[str, dict] = {} if state is None else dict(state["done"])
    phase = 0 if state is None else int(state["phase"])
    if state is not None:
        set_rng_state(state["rng"])

    def save(current: dict | None, phase_now: int) -> None:
        save_checkpoint(ckpt_path, {"config": asdict(cfg), "phase": phase_now, "done": done, "current": current,
                                    "rng": rng_state()}, format=OPERATOR_FORMAT)

    trained: dict[str, nn.Module] = {}
    for name, blob in done.items():
        model = build_model(cfg, name)
        model.load_state_dict(blob["model"])
        trained[name] = model
    for i, name in enumerate(cfg.models):
        if i < phase or name in done:
            continue
        current = state["current"] if state is not None and i == phase else None
        stop = until[1] if until is not None and until[0] == name else None
        model, parts = train_model(cfg, name, data, state=current, progress=progress,
                                   checkpoint=lambda p, i=i: save(p, i), checkpoint_every=checkpoint_every, until=stop)
        if stop is not None and stop < cfg.epochs:
            save(parts, i)
            return {"stopped": {"model": name, "epoch": stop}}
        done[name] = {"model": parts["model"], "history": parts["history"]}
        trained[name] = model
        save(None, i + 1)
    return _report(cfg, out, trained, done, data, darcy, t_data, plots)


def _report(cfg, out: Path, trained: dict, done: dict, data: dict, darcy: DarcyData, t_data: float, plots: bool) -> dict:
    results: dict = {"config": asdict(cfg), "data": {
        "problem": "-div(a grad u) = 1 on (0,1)^2, u = 0 on the boundary (Li et al. 2021)",
        "coefficients": f"threshold (12 / 3) of a GRF with covariance (-Laplacian + {darcy.settings.tau:g}^2)^-{darcy.settings.alpha:g}",
        "solver": "5-point finite differences, harmonic-mean faces, scipy.sparse direct solve",
        "grid": f"{cfg.resolution}x{cfg.resolution} nodes incl. boundary ({cfg.resolution - 2}^2 unknowns)",
        "n_train": cfg.n_train, "n_test": cfg.n_test, "generation_s": t_data},
        "noise_definition": "a + eps * rms(a) * N(0,1) pointwise; error against the clean solution",
        "models": {}}
    a_test, u_test = data["a_test"], data["u_test"]
    for name, model in trained.items():
        hist = done[name]["history"]
        ev = evaluate(model, a_test, u_test)
        rob = noise_robustness(model, a_test, u_test, list(cfg.noise), cfg.seed)
        mem = saved_activation_bytes(model, data["a_train"][:cfg.batch], data["u_train"][:cfg.batch])
        times = hist["epoch_time_s"]
        info = {"parameters": count_parameters(model), "held_out": ev, "noise": rob,
                "train_loss_final": hist["train_loss"][-1] if hist["train_loss"] else None,
                "epoch_time_s_median": float(np.median(times)) if times else None,
                "saved_activations_mib_per_batch": mem / 2 ** 20, "history": hist}
        if name == "explicit":
            info["kind"] = f"{cfg.explicit} FNO, cell applied k={cfg.k} times"
        else:
            info["kind"] = f"FNO-DEQ ({cfg.solver}, tol {cfg.tol:g}, max_iter {cfg.max_iter})"
        results["models"][name] = info
    results["target"] = {"rel_l2": 5e-2, "met": {n: m["held_out"]["rel_l2"] <= 5e-2 for n, m in results["models"].items()}}
    results["peak_rss_mib"] = peak_rss_mib()
    results["figures"] = save_figures(cfg, out, trained, results, a_test, u_test) if plots else []
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results


def save_figures(cfg: OperatorConfig, out: Path, trained: dict, results: dict, a: Tensor, u: Tensor) -> list[str]:
    """``darcy_fields.png`` (coefficient, truth, predictions and error maps of two held-out
    fields), ``darcy_noise.png`` (error vs noise), ``darcy_training.png`` (held-out error per epoch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    names = list(trained)
    preds = {n: predict(trained[n], a[:2]).cpu().numpy() for n in names}
    a_np, u_np = a[:2].cpu().numpy(), u[:2].cpu().numpy()
    cols = 2 + 2 * len(names)
    fig, axes = plt.subplots(2, cols, figsize=(2.6 * cols, 5.2), constrained_layout=True, squeeze=False)
    for r in range(2):
        panels = [(a_np[r], "coefficient a", "viridis"), (u_np[r], "truth u", "magma")]
        panels += [(preds[n][r], f"{n} prediction", "magma") for n in names]
        panels += [(np.abs(preds[n][r] - u_np[r]), f"{n} |error|", "inferno") for n in names]
        for ax, (img, title, cmap) in zip(axes[r], panels):
            im = ax.imshow(img.T, origin="lower", extent=[0, 1, 0, 1], cmap=cmap)
            ax.set_title(title, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
            fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle("Darcy flow, held-out fields")
    paths.append(out / "darcy_fields.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 4), constrained_layout=True)
    for j, n in enumerate(names):
        rows = results["models"][n]["noise"]
        ax.plot([r["noise"] for r in rows], [r["rel_l2"] for r in rows], ("o-", "s--", "^:", "D-.")[j % 4], label=n)
    ax.set(xlabel="relative noise ε on a", ylabel="held-out relative L2", yscale="log", title="robustness to noisy inputs")
    ax.legend()
    paths.append(out / "darcy_noise.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 4), constrained_layout=True)
    for j, n in enumerate(names):
        h = results["models"][n]["history"]
        ax.plot(h["epoch"], h["test_rel_l2"], color=f"C{j}", label=f"{n} held-out")
        ax.plot(h["epoch"], h["train_loss"], "--", color=f"C{j}", label=f"{n} train")
    ax.axhline(5e-2, color="gray", lw=0.8, ls=":", label="5 % target")
    ax.set(xlabel="epoch", ylabel="relative L2", yscale="log", title="training")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend()
    paths.append(out / "darcy_training.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return [str(p) for p in paths]


def config_fields() -> list[str]:
    return [f.name for f in fields(OperatorConfig)]
