"""Trained models for the analyses, through the training API (``deqdiff.training``), cached.

:func:`trained_snapshots` trains ``model`` once and keeps its parameters at the requested
epochs (epoch 0 is the initialization). All snapshots lie on one training run whose cosine
schedule spans ``horizon`` epochs: every stage resumes that run (``train(config, resume=True)``
with a growing ``max_steps``), so a snapshot is bit-identical to the same epoch of one
uninterrupted run, whether it was trained in one call or continued in a later one. Each
snapshot is saved as ``<cache>/<model>/epoch<E>.pt`` next to the run's ``config.json`` and its
``run/checkpoint.pt``; a later call with the same settings loads the snapshots it finds and
continues the run for the missing ones. Files of a run with other settings are deleted first,
so a snapshot is never mixed with another run's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

__all__ = ["trained_snapshots", "digits_split"]

_RUN_ONLY = ("out", "progress", "max_steps", "device", "checkpoint_every")
#: bumped when staged training changes its numbers. Version 1 resumed every stage with a
#: re-seeded data order; version 2 kept the snapshots of other runs (another schedule length)
#: next to a new run's, so a cache could mix two runs
_STAGING = 3


def _key(config) -> dict:
    return {**{k: v for k, v in config.to_dict().items() if k not in _RUN_ONLY}, "staging": _STAGING}


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def trained_snapshots(model: str, epochs: Sequence[int], cache: str | Path, *, horizon: int | None = None,
                      progress: bool = False, log=print, **settings) -> dict[int, nn.Module]:
    """``{epoch: model}`` for ``model`` ("conv", "repeat-K", "mon", …) trained by
    ``deqdiff.training.train`` with ``TrainConfig(model=model, epochs=horizon, **settings)``.

    ``horizon``: the run's length in epochs, i.e. the span of its learning-rate schedule
    (default ``max(epochs)``; ``deqdiff analyze`` passes the epochs of ``deqdiff train``, so
    that epoch 2 is epoch 2 of the standard run). Raises ``ValueError`` for a negative epoch or
    a horizon below ``max(epochs)``."""
    from ..data import load_dataset
    from ..training import TrainConfig, build_model, train
    from ..training.checkpoint import read_checkpoint

    epochs = sorted({int(e) for e in epochs})
    if not epochs or epochs[0] < 0:
        raise ValueError(f"epochs must be a non-empty list of integers >= 0, got {epochs}")
    horizon = max(max(epochs), 1) if horizon is None else int(horizon)
    if horizon < max(max(epochs), 1):
        raise ValueError(f"horizon must be >= the last requested epoch ({max(epochs)}) and >= 1, got {horizon}")
    root = Path(cache) / model
    config = TrainConfig(model=model, epochs=horizon, out=str(root / "run"), progress=progress, **settings)
    data = load_dataset(config.data, config.data_dir, seed=config.seed, test_fraction=config.test_fraction)
    if config.train_limit or config.test_limit:
        data = data.limit(config.train_limit, config.test_limit)
    key = _key(config)
    files = {e: root / f"epoch{e}.pt" for e in epochs}
    meta = root / "config.json"
    run_ckpt = root / "run" / "checkpoint.pt"
    root.mkdir(parents=True, exist_ok=True)
    if _read_json(meta) != key:  # nothing cached, or another run's files: never mix them with this run's
        for f in root.glob("epoch*.pt"):
            f.unlink()
        if run_ckpt.is_file():
            run_ckpt.unlink()
        meta.write_text(json.dumps(key, indent=1))

    out: dict[int, nn.Module] = {}
    for e, f in files.items():
        if not f.is_file():
            continue
        m = build_model(config, data.image_shape, data.num_classes)
        try:
            m.load_state_dict(torch.load(f, map_location="cpu", weights_only=True))
        except (RuntimeError, KeyError, EOFError, ValueError) as err:  # e.g. saved for a model with other parameters
            first = (str(err).strip() or type(err).__name__).splitlines()[0]
            log(f"[analyze] {model}: cached snapshot {f} does not fit this model ({first}); training again")
            f.unlink()
        else:
            out[e] = m.eval()
    missing = [e for e in epochs if e not in out]
    if not missing:
        log(f"[analyze] {model}: loaded cached snapshots {epochs} from {root}")
        return out
    if out:
        log(f"[analyze] {model}: loaded cached snapshots {sorted(out)} from {root}")
    steps_per_epoch = math.ceil(data.size("train") / config.batch_size)
    if run_ckpt.is_file():
        try:
            done = int(read_checkpoint(run_ckpt)["step"])
        except (ValueError, KeyError):
            done = None
        if done is None or done > missing[0] * steps_per_epoch:
            run_ckpt.unlink()  # unreadable, or past the first missing epoch: that one needs a fresh start
    for e in missing:
        config.max_steps = e * steps_per_epoch
        log(f"[analyze] {model}: training to epoch {e} of {horizon} ({config.max_steps} steps)")
        result = train(config, data, resume=True)
        torch.save(result.model.state_dict(), files[e])
        m = build_model(config, data.image_shape, data.num_classes)
        m.load_state_dict(result.model.state_dict())
        out[e] = m.eval()
    return dict(sorted(out.items()))


def digits_split(data: str = "digits", *, split: str = "test", limit: int | None = None, seed: int = 0,
                 dtype: torch.dtype = torch.float32, data_dir: str | None = None):
    """Normalized images and labels of ``split`` (first ``limit`` samples)."""
    from ..data import load_dataset

    ds = load_dataset(data, data_dir, seed=seed)
    n = ds.size(split) if limit is None else min(limit, ds.size(split))
    from ._common import standard_strides

    return standard_strides(ds.images(split, slice(0, n), dtype=dtype)), ds.labels(split, slice(0, n))
