"""Output heads on the paper's gated output module."""

from hmrnn_lightning.heads.base import Head
from hmrnn_lightning.heads.output_module import GatedOutputModule
from hmrnn_lightning.heads.softmax import SoftmaxHead

__all__ = ["GatedOutputModule", "Head", "SoftmaxHead"]
