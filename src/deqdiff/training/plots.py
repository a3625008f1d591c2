"""Training curves of a classifier run (``metrics.json`` of ``deqdiff train``)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["plot_training_curves"]


def plot_training_curves(history: dict, path: str | Path, title: str = "") -> Path:
    """Three panels from a run's ``history`` (``{"steps": [...], "epochs": [...]}``, as in
    ``metrics.json``): cross-entropy loss per step (train) and per epoch (train mean, test);
    accuracy per epoch (train, test, %); forward-solve iterations per epoch (mean and max over
    samples; DEQ models only). Writes a PNG to ``path`` and returns it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    steps, epochs = history.get("steps", []), history.get("epochs", [])
    per_epoch = max(1, len(steps) // max(1, len(epochs)))
    fig, (ax_loss, ax_acc, ax_it) = plt.subplots(1, 3, figsize=(13, 3.8), constrained_layout=True)
    if steps:
        ax_loss.plot([s["step"] / per_epoch for s in steps], [s["loss"] for s in steps], color="0.7", lw=0.8,
                     label="train (per step)")
    e = [r["epoch"] for r in epochs]
    if epochs:
        ax_loss.plot(e, [r["train"]["loss"] for r in epochs], "o-", color="C0", label="train (epoch mean)")
        ax_loss.plot(e, [r["test"]["loss"] for r in epochs], "s--", color="C1", label="test")
        ax_acc.plot(e, [100 * r["train"]["acc"] for r in epochs], "o-", color="C0", label="train")
        ax_acc.plot(e, [100 * r["test"]["acc"] for r in epochs], "s--", color="C1", label="test")
        if any("fwd_iter_mean" in r["test"] for r in epochs):
            ax_it.plot(e, [r["train"].get("fwd_iter_mean", float("nan")) for r in epochs], "o-", color="C0",
                       label="train, mean")
            ax_it.plot(e, [r["train"].get("fwd_iter_max", float("nan")) for r in epochs], "o:", color="C0",
                       label="train, max")
            ax_it.plot(e, [r["test"].get("fwd_iter_mean", float("nan")) for r in epochs], "s--", color="C1",
                       label="test, mean")
            ax_it.legend(fontsize=8)
        else:
            ax_it.text(0.5, 0.5, "explicit model:\nno forward solve", ha="center", va="center",
                       transform=ax_it.transAxes)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", yscale="log", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    ax_it.set(xlabel="epoch", ylabel="forward iterations per sample", title="forward solve")
    for ax in (ax_loss, ax_acc, ax_it):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    ax_loss.legend(fontsize=8)
    ax_acc.legend(fontsize=8, loc="lower right")
    if title:
        fig.suptitle(title)
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
