"""Trained models for the analyses, through the training API (``deqdiff.training``), cached.

:func:`trained_snapshots` trains ``model`` once and keeps its parameters at the requested
epochs (epoch 0 is the initialization): every stage resumes the same run
(``train(config, resume=True)`` with a growing ``max_steps``), so the snapshots lie on one
training trajectory, bit-identical to one uninterrupted run. Each snapshot is saved as
``<cache>/<model>/epoch<E>.pt`` next to the
run's ``config.json``; a later call with the same settings loads them instead of training.
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
#: bumped when staged training changes its numbers: snapshots cached by version 1 resumed every
#: stage with a re-seeded data order, so they differ from one continuous run and are retrained
_STAGING = 2


def _key(config) -> dict:
    return {**{k: v for k, v in config.to_dict().items() if k not in _RUN_ONLY}, "staging": _STAGING}


def trained_snapshots(model: str, epochs: Sequence[int], cache: str | Path, *, progress: bool = False,
                      log=print, **settings) -> dict[int, nn.Module]:
    """``{epoch: model}`` for ``model`` ("conv", "repeat-K", "mon", …) trained by
    ``deqdiff.training.train`` with ``TrainConfig(model=model, epochs=max(epochs), **settings)``."""
    from ..data import load_dataset
    from ..training import TrainConfig, build_model, train

    epochs = sorted({int(e) for e in epochs})
    if epochs[0] < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    root = Path(cache) / model
    config = TrainConfig(model=model, epochs=max(max(epochs), 1), out=str(root / "run"), progress=progress, **settings)
    data = load_dataset(config.data, config.data_dir, seed=config.seed, test_fraction=config.test_fraction)
    if config.train_limit or config.test_limit:
        data = data.limit(config.train_limit, config.test_limit)
    key = _key(config)
    files = {e: root / f"epoch{e}.pt" for e in epochs}
    meta = root / "config.json"
    out: dict[int, nn.Module] = {}
    if meta.is_file() and json.loads(meta.read_text()) == key and all(f.is_file() for f in files.values()):
        try:
            for e, f in files.items():
                m = build_model(config, data.image_shape, data.num_classes)
                m.load_state_dict(torch.load(f, map_location="cpu", weights_only=True))
                out[e] = m.eval()
        except (RuntimeError, KeyError) as err:  # saved by a version whose model had other parameters
            first = str(err).strip().splitlines()[0]
            log(f"[analyze] {model}: cached snapshots in {root} do not fit this model ({first}); training again")
            out = {}
        else:
            log(f"[analyze] {model}: loaded cached snapshots {epochs} from {root}")
            return out
    root.mkdir(parents=True, exist_ok=True)
    run_ckpt = root / "run" / "checkpoint.pt"
    if run_ckpt.is_file():
        run_ckpt.unlink()  # the run may be past the first missing epoch (or had other settings): start over
    meta.write_text(json.dumps(key, indent=1))
    steps_per_epoch = math.ceil(data.size("train") / config.batch_size)
    for e in epochs:
        config.max_steps = e * steps_per_epoch
        log(f"[analyze] {model}: training to epoch {e} ({config.max_steps} steps)")
        result = train(config, data, resume=True)
        torch.save(result.model.state_dict(), files[e])
        m = build_model(config, data.image_shape, data.num_classes)
        m.load_state_dict(result.model.state_dict())
        out[e] = m.eval()
    return out


def digits_split(data: str = "digits", *, split: str = "test", limit: int | None = None, seed: int = 0,
                 dtype: torch.dtype = torch.float32, data_dir: str | None = None):
    """Normalized images and labels of ``split`` (first ``limit`` samples)."""
    from ..data import load_dataset

    ds = load_dataset(data, data_dir, seed=seed)
    n = ds.size(split) if limit is None else min(limit, ds.size(split))
    from ._common import standard_strides

    return standard_strides(ds.images(split, slice(0, n), dtype=dtype)), ds.labels(split, slice(0, n))
