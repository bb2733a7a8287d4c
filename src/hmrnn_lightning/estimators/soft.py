"""Undiscretised boundaries (the paper's "Soft*" row)."""

from __future__ import annotations

from torch import Tensor

from hmrnn_lightning.estimators.base import BoundaryEstimator


class SoftEstimator(BoundaryEstimator):
    """``z = hard_sigm(a z~)``, a value in [0, 1] used as is.

    With soft ``z`` the UPDATE / COPY / FLUSH weights of :mod:`hmrnn_lightning.cells.operations`
    become a convex mixture of the three operations instead of a choice of one.

    Args:
        slope: initial slope ``a`` of the hard sigmoid.
    """

    kernel_mode = "soft"

    discrete = False

    def forward(self, logit: Tensor) -> Tensor:
        return self.probability(logit)
