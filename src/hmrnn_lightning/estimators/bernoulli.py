"""Sampled boundaries with the straight-through gradient (the paper's "Sampling" row)."""

from __future__ import annotations

import torch
from torch import Tensor

from hmrnn_lightning.estimators.base import BoundaryEstimator, straight_through


class BernoulliEstimator(BoundaryEstimator):
    """``z ~ Bernoulli(hard_sigm(a z~))`` in training; backward as :class:`StepEstimator`.

    At evaluation the decision is the deterministic threshold ``hard_sigm > 0.5``, so
    validation BPC does not depend on the random draw, unless ``sample_at_eval``.

    Args:
        slope: initial slope ``a`` of the hard sigmoid.
        sample_at_eval: keep sampling when the module is in eval mode.
    """

    kernel_mode = "bernoulli"

    def __init__(self, slope: float = 1.0, sample_at_eval: bool = False) -> None:
        super().__init__(slope)
        self.sample_at_eval = sample_at_eval

    def active_kernel_mode(self) -> str | None:
        """Thresholds like the step estimator when it does not sample (eval mode)."""
        mode = super().active_kernel_mode()
        return "step" if mode == "bernoulli" and not (self.training or self.sample_at_eval) else mode

    def forward(self, logit: Tensor) -> Tensor:
        p = self.probability(logit)
        if self.training or self.sample_at_eval:
            hard = torch.bernoulli(p.detach())
        else:
            hard = p > 0.5
        return straight_through(hard, p)
