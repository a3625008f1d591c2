"""Checkpoints that resume bit-exactly: model, optimizer, scheduler, every RNG (torch, CUDA,
numpy, python, the data-order generator) and the position (epoch, step, step within the epoch,
the epoch's running sums). Stored with plain tensors/lists only, so ``torch.load`` runs with
``weights_only=True``. The physics-informed runs (``deqdiff pinn``) write theirs through the
same functions under their own format tag (:data:`PINN_FORMAT`)."""

from __future__ import annotations

import os
import pickle
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .config import TrainConfig

__all__ = ["FORMAT", "PINN_FORMAT", "rng_state", "set_rng_state", "save_checkpoint", "read_checkpoint",
           "load_checkpoint", "LoadedCheckpoint"]

FORMAT = "deqdiff-train-checkpoint/1"
PINN_FORMAT = "deqdiff-pinn-checkpoint/1"


def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, state, gauss_next = random.getstate()
    out = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": version, "state": list(state), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, state: dict, *, format: str = FORMAT) -> None:
    """Write atomically (a crash mid-write leaves the previous checkpoint intact)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({**state, "format": format}, tmp)
    os.replace(tmp, path)


def read_checkpoint(path: str | Path, map_location="cpu", *, format: str = FORMAT,
                    unversioned: bool = False) -> dict:
    """The checkpoint at ``path`` (a file, or a run directory holding ``checkpoint.pt``).

    Raises ``FileNotFoundError`` if there is none and ``ValueError`` if the file is not a
    checkpoint of ``format`` (``unversioned``: also accept a dict without a format tag, as
    written before the tag existed)."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:  # truncated, or not torch.save's
        first = (str(err).strip() or type(err).__name__).splitlines()[0].split(". ")[0]
        raise ValueError(f"{path} is not a readable deqdiff checkpoint ({first})") from err
    tag = state.get("format") if isinstance(state, dict) else None
    if not isinstance(state, dict) or (tag != format and not (unversioned and tag is None)):
        raise ValueError(f"{path} is not a deqdiff checkpoint of format {format} (found {tag})")
    return state


@dataclass
class LoadedCheckpoint:
    model: nn.Module
    config: TrainConfig
    state: dict  # the whole checkpoint (history, epoch, step, optimizer state …)

    @property
    def history(self) -> dict:
        return self.state["history"]


def load_checkpoint(path: str | Path, *, device: str | None = None) -> LoadedCheckpoint:
    """Rebuild the trained model of a run (``path``: ``checkpoint.pt`` or its run directory),
    in eval mode, on ``device`` (default: the run's device if available, else CPU)."""
    from .models import build_model

    state = read_checkpoint(path)
    config = TrainConfig.from_dict(dict(state["config"]))
    if device is None:
        device = config.device if (not config.device.startswith("cuda") or torch.cuda.is_available()) else "cpu"
    config.device = device
    info = state["data_info"]
    model = build_model(config, tuple(info["image_shape"]), int(info["num_classes"]))
    model.load_state_dict(state["model"])
    model.eval()
    return LoadedCheckpoint(model, config, state)
