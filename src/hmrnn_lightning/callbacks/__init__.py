"""Lightning callbacks."""

from hmrnn_lightning.callbacks.slope_annealing import SlopeAnnealing, annealed_slope

__all__ = ["SlopeAnnealing", "annealed_slope"]
