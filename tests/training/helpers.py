"""Tiny synthetic data and configs shared by the training tests (fast on one CPU core)."""

from __future__ import annotations

import torch

from deqdiff.data import ImageDataset
from deqdiff.training import TrainConfig


def tiny_data(n_train=40, n_test=12, seed=0) -> ImageDataset:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n_train + n_test,), generator=g)
    images = torch.randn(n_train + n_test, 1, 4, 4, generator=g, dtype=torch.float32)
    images[:, 0, 0, 0] += 2.0 * labels  # learnable signal
    return ImageDataset(
        "tiny", images[:n_train], labels[:n_train], images[n_train:], labels[n_train:],
        torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64), 3,
    )


def tiny_config(**kw) -> TrainConfig:
    base = dict(model="conv", channels=4, hidden=4, groups=2, epochs=2, batch_size=8, eval_batch_size=16,
                tol=1e-4, max_iter=30, progress=False, lr=None if str(kw.get("model", "")).startswith("mon") else 1e-2)
    base.update(kw)
    return TrainConfig(**base)


def fit_and_compare(run_dir, fit_samples: int):
    """Fit a kernel-initialized neural solver to a run directory (ground truth at the model's
    tolerance) and compare it with Anderson on the run's held-out inputs: ``(run, summary row)``."""
    import warnings

    from deqdiff.solvers.neural import FallbackWarning
    from deqdiff.solvers.neural_fit import FitConfig
    from deqdiff.training.fit_solver import compare_solvers, fit_run, load_run, summary

    run = load_run(run_dir, fit_samples=fit_samples)
    fitted = fit_run(run, fit=FitConfig(steps=0, initializer="kernel", gt_tol=run.tol, warm_start=16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackWarning)
        results = compare_solvers(run, fitted.solver, [2])
    return run, summary(run, fitted, results)
