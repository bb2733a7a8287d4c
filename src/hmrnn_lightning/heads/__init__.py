"""Output heads on the paper's gated output module."""

from hmrnn_lightning.heads.base import Head
from hmrnn_lightning.heads.mdn import Mixture, MixtureDensityHead, bivariate_normal_log_density
from hmrnn_lightning.heads.output_module import GatedOutputModule
from hmrnn_lightning.heads.softmax import SoftmaxHead

__all__ = ["GatedOutputModule", "Head", "Mixture", "MixtureDensityHead", "SoftmaxHead", "bivariate_normal_log_density"]
