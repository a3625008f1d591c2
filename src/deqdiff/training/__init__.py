"""Training of DEQ classifiers (``deqdiff train``): configs, models, checkpoints, data parallelism.

Python API: ``train(TrainConfig(...)) -> TrainResult``, ``build_model(config, image_shape,
num_classes)``, ``load_checkpoint(path) -> LoadedCheckpoint(model, config, state)``,
``evaluate(model, data, config)``.
"""

from .checkpoint import LoadedCheckpoint, load_checkpoint, read_checkpoint
from .config import TrainConfig
from .distributed import DistContext, init_from_env
from .jacobian import capture_equilibrium, hutchinson_frobenius
from .metrics import Meter
from .models import build_model, model_kind
from .trainer import TrainResult, evaluate, train

__all__ = [
    "DistContext",
    "LoadedCheckpoint",
    "Meter",
    "TrainConfig",
    "TrainResult",
    "build_model",
    "capture_equilibrium",
    "evaluate",
    "hutchinson_frobenius",
    "init_from_env",
    "load_checkpoint",
    "model_kind",
    "read_checkpoint",
    "train",
]
