"""DEQ layers and models built on the engine."""

from .deq import DEQ
from .dropout import VariationalDropout

__all__ = ["DEQ", "VariationalDropout"]
