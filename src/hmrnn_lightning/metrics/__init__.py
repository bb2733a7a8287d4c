"""torchmetrics metrics: bits per character, boundary statistics and F1, sequence log-likelihood."""

from hmrnn_lightning.metrics.boundaries import BoundaryStatistics, SeparatorRates
from hmrnn_lightning.metrics.boundary_f1 import BoundaryF1, EndNeighbourRates
from hmrnn_lightning.metrics.bpc import BitsPerCharacter
from hmrnn_lightning.metrics.loglik import SequenceLogLikelihood

__all__ = ["BitsPerCharacter", "BoundaryF1", "BoundaryStatistics", "EndNeighbourRates", "SeparatorRates", "SequenceLogLikelihood"]
