"""DEQ layers and models built on the engine."""

from .compile import compile_cell
from .deq import DEQ
from .dropout import VariationalDropout
from .normalization import SpectralNorm, apply_spectral_norm, apply_weight_norm, spectral_norm, update_spectral_norms

__all__ = ["DEQ", "SpectralNorm", "VariationalDropout", "apply_spectral_norm", "apply_weight_norm", "compile_cell", "spectral_norm",
           "update_spectral_norms"]
