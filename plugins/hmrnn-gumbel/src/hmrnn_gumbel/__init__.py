"""A Gumbel-sigmoid straight-through boundary estimator, packaged as an hmrnn-lightning plugin."""

from __future__ import annotations

import torch
from torch import Tensor

from hmrnn_lightning.estimators import BoundaryEstimator, straight_through


class GumbelSigmoidEstimator(BoundaryEstimator):
    """``z = 1[sigm((a x + logistic noise) / tau) > 0.5]``, gradient of the relaxed sigmoid.

    A binary Gumbel-softmax (Jang et al. 2017; Maddison et al. 2017): the difference of two
    Gumbel variables is logistic noise, so the relaxed sample is ``sigm((a x + L) / tau)``.
    At evaluation the noise is dropped.

    Args:
        slope: scale ``a`` applied to the boundary logit (annealed like the hard sigmoid's).
        temperature: relaxation temperature ``tau`` (> 0).
    """

    def __init__(self, slope: float = 1.0, temperature: float = 1.0) -> None:
        super().__init__(slope)
        if temperature <= 0:
            raise ValueError(f"GumbelSigmoidEstimator: temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, logit: Tensor) -> Tensor:
        scaled = self.slope * logit.float()
        if self.training:
            u = torch.rand_like(scaled).clamp(1e-6, 1 - 1e-6)
            scaled = scaled + torch.log(u) - torch.log1p(-u)
        relaxed = torch.sigmoid(scaled / self.temperature)
        return straight_through(relaxed > 0.5, relaxed)
