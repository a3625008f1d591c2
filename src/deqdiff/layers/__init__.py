"""DEQ layers and models built on the engine."""

from .deq import DEQ

__all__ = ["DEQ"]
