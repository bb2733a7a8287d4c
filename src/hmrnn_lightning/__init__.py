"""hmrnn-lightning: Hierarchical Multiscale RNNs (Chung, Ahn & Bengio, ICLR 2017) for PyTorch Lightning."""

from hmrnn_lightning.callbacks import SlopeAnnealing
from hmrnn_lightning.cells import HMLSTMCell, HMRNNCell, HMStack, LSTMStack
from hmrnn_lightning.estimators import BernoulliEstimator, ReinforceEstimator, SoftEstimator, StepEstimator
from hmrnn_lightning.heads import GatedOutputModule, SoftmaxHead
from hmrnn_lightning.metrics import BitsPerCharacter, BoundaryStatistics
from hmrnn_lightning.models import HMRNNLanguageModel

__version__ = "0.1.0"

__all__ = [
    "BernoulliEstimator", "BitsPerCharacter", "BoundaryStatistics", "GatedOutputModule", "HMLSTMCell",
    "HMRNNCell", "HMRNNLanguageModel", "HMStack", "LSTMStack", "ReinforceEstimator", "SlopeAnnealing",
    "SoftEstimator", "SoftmaxHead", "StepEstimator",
]
