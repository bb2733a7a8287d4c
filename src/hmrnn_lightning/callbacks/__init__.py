"""Lightning callbacks."""

from hmrnn_lightning.callbacks.boundary_plot import BoundaryPlot
from hmrnn_lightning.callbacks.fault_detection import FaultDetection, TrainingFault
from hmrnn_lightning.callbacks.handwriting_plot import HandwritingPlot
from hmrnn_lightning.callbacks.last_checkpoint import LastCheckpoint, TrainingInterrupted
from hmrnn_lightning.callbacks.lost_rank import LostRank
from hmrnn_lightning.callbacks.slope_annealing import SlopeAnnealing, annealed_slope
from hmrnn_lightning.callbacks.training_health import TrainingHealth

__all__ = [
    "BoundaryPlot", "FaultDetection", "HandwritingPlot", "LastCheckpoint", "LostRank", "SlopeAnnealing", "TrainingFault", "TrainingHealth", "TrainingInterrupted", "annealed_slope",
]
