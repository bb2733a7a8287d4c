"""Lightning callbacks."""

from hmrnn_lightning.callbacks.boundary_plot import BoundaryPlot
from hmrnn_lightning.callbacks.handwriting_plot import HandwritingPlot
from hmrnn_lightning.callbacks.slope_annealing import SlopeAnnealing, annealed_slope

__all__ = ["BoundaryPlot", "HandwritingPlot", "SlopeAnnealing", "annealed_slope"]
