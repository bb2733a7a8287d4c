"""Deterministic step function with the straight-through hard-sigmoid gradient (eq. 9)."""

from __future__ import annotations

from torch import Tensor

from hmrnn_lightning.estimators.base import BoundaryEstimator, straight_through


class StepEstimator(BoundaryEstimator):
    """``z = 1[hard_sigm(a z~) > 0.5]``; backward: the derivative of ``hard_sigm``.

    The paper's best PTB rows ("Step Fn." and "Step Fn. & Slope Annealing").
    The gradient is ``a/2`` where ``|a z~| < 1`` and 0 outside.

    Args:
        slope: initial slope ``a`` of the hard sigmoid.
    """

    kernel_mode = "step"

    def forward(self, logit: Tensor) -> Tensor:
        p = self.probability(logit)
        return straight_through(p > 0.5, p)
