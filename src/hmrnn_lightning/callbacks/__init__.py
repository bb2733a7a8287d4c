"""Lightning callbacks."""

from hmrnn_lightning.callbacks.boundary_plot import BoundaryPlot
from hmrnn_lightning.callbacks.slope_annealing import SlopeAnnealing, annealed_slope

__all__ = ["BoundaryPlot", "SlopeAnnealing", "annealed_slope"]
