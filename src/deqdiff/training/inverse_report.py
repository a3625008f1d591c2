"""What ``deqdiff inverse`` reports about trained reconstruction models, and its figures.

* PSNR (dB, peak 1) on the held-out split of the measurement itself, the DEQ at its fixed point
  and the unrolled network at its K training steps;
* test-time iterations beyond training (Gilton, Ongie & Willett 2021 compare this way): the
  unrolled network run for m·K steps and the DEQ solved with m times its iteration budget at a
  tighter tolerance, m ∈ ``multiples``; and the PSNR of both cells after n = 1 … ``curve_max``
  plain iterations from Aᵀy (the curve of the figure);
* the DEQ's forward iterations, residuals, converged fraction and a power-iteration estimate of
  ‖∂f/∂z‖₂ at z* (whether the learned cell contracts there);
* the memory of one training step (:func:`step_memory`) and the time per epoch.
"""

from __future__ import annotations

import gc
import statistics

import torch
from torch import Tensor, nn

from ..models.inverse import cell_lipschitz, psnr, unrolled
from .distributed import DistContext
from .inverse import InverseConfig, InverseResult, evaluate_inverse
from .memtrace import peak_rss_mib, reset_peak_rss

__all__ = ["assess", "step_memory", "psnr_curve", "plot_examples", "plot_psnr_curve", "plot_training"]


def step_memory(model: nn.Module, y: Tensor, x: Tensor) -> dict:
    """Memory of one training step (forward, MSE loss, backward) on the batch ``(y, x)``:

    * ``saved_mib``: the tensors autograd keeps from the forward pass for the backward pass
      (counted with ``torch.autograd.graph.saved_tensors_hooks``; each storage once) — for the
      unrolled network this grows with K, for the DEQ it does not;
    * ``peak_mib``: CUDA ``max_memory_allocated`` above the memory in use before the step, or on
      CPU the step's rise of the process's peak resident memory (``VmHWM`` after resetting the
      high-water mark; ``hiwater_reset`` says whether that reset worked — if not, only a rise
      above every earlier peak of the process shows). Memory the allocator kept from earlier
      steps is reused without a rise, so in a long-lived process this is a lower bound; the
      benchmark measures it in a fresh process.
    The gradients are cleared afterwards."""
    seen: dict[int, int] = {}

    def pack(t: Tensor):
        try:
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        except (RuntimeError, NotImplementedError):  # e.g. tensors without storage under transforms
            pass
        return t

    cuda = y.device.type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.synchronize(y.device)
        torch.cuda.reset_peak_memory_stats(y.device)
        before = torch.cuda.memory_allocated(y.device)
    else:
        reset = reset_peak_rss()
        before = peak_rss_mib()
    was_training = model.training
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(y)
        loss = (out - x).pow(2).mean()
    loss.backward()
    model.train(was_training)
    if cuda:
        torch.cuda.synchronize(y.device)
        peak = (torch.cuda.max_memory_allocated(y.device) - before) / 2 ** 20
        extra = {"method": "cuda.max_memory_allocated"}
    else:
        peak = peak_rss_mib() - before
        extra = {"method": "VmHWM rise", "hiwater_reset": reset}
    model.zero_grad(set_to_none=True)
    return {"saved_mib": sum(seen.values()) / 2 ** 20, "peak_mib": peak, "batch": int(y.shape[0]), **extra}


def psnr_curve(cell: nn.Module, y: Tensor, x: Tensor, iterations: int, *, batch: int = 256) -> list[float]:
    """Mean PSNR of ``cell`` iterated n = 0 … ``iterations`` times from Aᵀy (plain iteration)."""
    sums = torch.zeros(iterations + 1, dtype=torch.float64)
    with torch.no_grad():
        for s in range(0, y.shape[0], batch):
            traj = unrolled(cell, y[s:s + batch], iterations, trajectory=True)
            sums += torch.stack([psnr(z, x[s:s + batch]).double().sum() for z in traj])
    return (sums / y.shape[0]).tolist()


def assess(result: InverseResult, data, *, multiples: tuple[int, ...] = (1, 2, 4), extra_tol: float | None = None,
           curve_max: int | None = None, lipschitz_samples: int = 32) -> dict:
    """The report of the module docstring for the trained models of ``result`` on the held-out
    split of ``data`` (an :class:`~deqdiff.data.inverse.InverseData`), computed in this process alone
    (under ``torch.distributed``, call it on one rank). ``extra_tol``: the DEQ's
    tolerance when given more iterations (default 1e-5 in float32, 1e-8 in float64);
    ``curve_max``: the last n of the curves (default max(multiples)·K)."""
    cfg: InverseConfig = result.config
    dtype = getattr(torch, cfg.dtype)
    alone = DistContext()  # the report runs on one rank only: no collective calls
    device = next(iter(result.models.values())).parameters().__next__().device
    y, x = data.batch("test", slice(None), dtype=dtype, device=device)
    extra_tol = extra_tol or (1e-5 if dtype == torch.float32 else 1e-8)
    curve_max = curve_max or max(multiples) * cfg.k
    report: dict = {"test_images": int(y.shape[0]), "measurement_psnr": float(psnr(y, x).mean()),
                    "multiples": list(multiples), "models": {}}
    yb, xb = data.batch("train", slice(0, cfg.batch_size), dtype=dtype, device=device)
    for kind, model in result.models.items():
        hist = result.history[kind]["epochs"]
        ev = evaluate_inverse(model, data, cfg, ctx=alone, device=str(device))
        entry: dict = {"psnr": ev["psnr"],
                       "time_per_epoch_s": statistics.median(e["time_s"] for e in hist) if hist else None,
                       "epochs": len(hist)}
        if kind == "deq":
            entry.update({k: ev[k] for k in ("fwd_iter_mean", "fwd_iter_max", "fwd_res_mean", "fwd_res_max",
                                             "fwd_converged") if k in ev})
            entry["train_fwd_iter_mean"] = hist[-1]["train"].get("fwd_iter_mean") if hist else None
            entry["train_bwd_iter_mean"] = hist[-1]["train"].get("bwd_iter_mean") if hist else None
            entry["extra_iterations"] = {}
            for m in multiples:
                ev = evaluate_inverse(model, data, cfg, ctx=alone, device=str(device), max_iter=m * cfg.max_iter,
                                      tol=extra_tol)
                entry["extra_iterations"][str(m)] = {
                    "max_iter": m * cfg.max_iter, "tol": extra_tol, "psnr": ev["psnr"],
                    "fwd_iter_mean": ev.get("fwd_iter_mean"), "fwd_res_max": ev.get("fwd_res_max"),
                    "fwd_converged": ev.get("fwd_converged")}
            with torch.no_grad():
                ys = y[:lipschitz_samples]
                z = model(ys, tol=extra_tol, max_iter=4 * cfg.max_iter)
            lip = cell_lipschitz(model.cell, z, ys)
            entry["lipschitz_at_fixed_point"] = {"mean": float(lip.mean()), "max": float(lip.max()),
                                                 "samples": int(lip.numel())}
        else:
            entry["k"] = cfg.k
            entry["extra_iterations"] = {}
            with torch.no_grad():
                for m in multiples:
                    entry["extra_iterations"][str(m)] = {
                        "iterations": m * cfg.k, "psnr": float(psnr(unrolled(model.cell, y, m * cfg.k), x).mean())}
        entry["plain_iteration_psnr"] = psnr_curve(model.cell, y, x, curve_max)
        entry["step_memory"] = step_memory(model, yb, xb)
        report["models"][kind] = entry
    report["curve_iterations"] = list(range(curve_max + 1))
    return report


def _agg():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_examples(models: dict[str, nn.Module], data, config: InverseConfig, path, *, count: int = 6) -> None:
    """Rows: measurement, DEQ, unrolled-K (those trained), truth; ``count`` held-out images."""
    plt = _agg()
    dtype = getattr(torch, config.dtype)
    device = next(iter(models.values())).parameters().__next__().device
    y, x = data.batch("test", slice(0, count), dtype=dtype, device=device)
    rows = [("measurement", y)]
    with torch.no_grad():
        for kind, model in models.items():
            model.eval()
            label = "DEQ (fixed point)" if kind == "deq" else f"unrolled K={config.k}"
            rows.append((label, model(y)))
    rows.append(("truth", x))
    fig, axes = plt.subplots(len(rows), count, figsize=(1.4 * count, 1.5 * len(rows)), squeeze=False)
    for r, (label, imgs) in enumerate(rows):
        for c in range(count):
            ax = axes[r][c]
            ax.imshow(imgs[c, 0].detach().float().cpu().clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            if label != "truth":
                ax.set_title(f"{float(psnr(imgs[c:c + 1], x[c:c + 1])):.1f} dB", fontsize=7)
            if c == 0:
                ax.set_ylabel(label, fontsize=7)
    fig.suptitle(f"{config.task} on {config.data}: six held-out images (PSNR against the truth above each)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_psnr_curve(report: dict, config: InverseConfig, path) -> None:
    """PSNR vs test-time iterations: both cells iterated from Aᵀy, K marked, DEQ solution level."""
    plt = _agg()
    n = report["curve_iterations"]
    fig, ax = plt.subplots(figsize=(7.2, 3.4))
    models = report["models"]
    if "deq" in models:
        ax.plot(n, models["deq"]["plain_iteration_psnr"], label="DEQ cell, plain iteration")
        ax.axhline(models["deq"]["psnr"], color="C0", ls=":", lw=1, label="DEQ fixed point (Anderson)")
    if "unrolled" in models:
        ax.plot(n, models["unrolled"]["plain_iteration_psnr"], label=f"unrolled (trained K={config.k})", color="C1")
        ax.axvline(config.k, color="C1", ls="--", lw=1)
    ax.axhline(report["measurement_psnr"], color="gray", ls="-.", lw=1, label="measurement")
    ax.set_xlabel("test-time iterations n (from Aᵀy)")
    ax.set_ylabel("held-out PSNR (dB)")
    ax.set_title(f"{config.task}: PSNR vs test-time iterations", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)  # outside the curves
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_training(history: dict[str, dict], path, config: InverseConfig | None = None) -> None:
    """Held-out PSNR after each epoch, per model (``config`` names the task and K)."""
    from matplotlib.ticker import MaxNLocator

    plt = _agg()
    fig, ax = plt.subplots(figsize=(4.8, 3.2))
    for kind, h in history.items():
        ep = [e["epoch"] for e in h["epochs"]]
        label = "DEQ (fixed point)" if kind == "deq" else (f"unrolled K={config.k}" if config is not None else kind)
        ax.plot(ep, [e["test"]["psnr"] for e in h["epochs"]], marker="o", ms=3, label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("held-out PSNR (dB)")
    ax.set_title("training" if config is None else f"{config.task} on {config.data}: held-out PSNR per epoch",
                 fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
