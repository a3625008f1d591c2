"""Error metrics against a reference trajectory: IAE and relative L2."""

from __future__ import annotations

import numpy as np

__all__ = ["iae", "relative_l2"]


def iae(pred: np.ndarray, ref: np.ndarray, t: np.ndarray) -> float:
    """Integrated absolute error ``Σ_i ∫ |ŷ_i(t) − y_i(t)| dt`` (trapezoid rule) for ``(T, n)`` arrays."""
    err = np.abs(np.asarray(pred) - np.asarray(ref))
    return float(np.trapezoid(err, np.asarray(t), axis=0).sum())


def relative_l2(pred: np.ndarray, ref: np.ndarray) -> float:
    """``‖ŷ − y‖₂ / ‖y‖₂`` over every entry."""
    pred, ref = np.asarray(pred), np.asarray(ref)
    return float(np.linalg.norm(pred - ref) / max(np.linalg.norm(ref), 1e-300))
