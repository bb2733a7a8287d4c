"""torchmetrics metrics: bits per character, boundary statistics."""

from hmrnn_lightning.metrics.boundaries import BoundaryStatistics
from hmrnn_lightning.metrics.boundary_f1 import BoundaryF1
from hmrnn_lightning.metrics.bpc import BitsPerCharacter

__all__ = ["BitsPerCharacter", "BoundaryF1", "BoundaryStatistics"]
