"""LightningModules."""

from hmrnn_lightning.models.handwriting import HandwritingModel
from hmrnn_lightning.models.language_model import HMRNNLanguageModel

__all__ = ["HMRNNLanguageModel", "HandwritingModel"]
