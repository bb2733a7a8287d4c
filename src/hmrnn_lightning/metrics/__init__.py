"""torchmetrics metrics: bits per character, boundary statistics."""

from hmrnn_lightning.metrics.boundaries import BoundaryStatistics
from hmrnn_lightning.metrics.bpc import BitsPerCharacter

__all__ = ["BitsPerCharacter", "BoundaryStatistics"]
