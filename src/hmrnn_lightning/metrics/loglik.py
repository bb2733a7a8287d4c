"""Average log-likelihood per sequence (the paper's Table 3 number)."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


class SequenceLogLikelihood(Metric):
    """``sum over sequences of (sum over real steps of log p) / number of sequences``, in nats.

    ``update(step_loglik [batch, time], mask [batch, time])``; float64 sums, reduced across ranks.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("sequences", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, step_loglik: Tensor, mask: Tensor) -> None:
        self.total += (step_loglik.detach().double() * mask.double()).sum()
        self.sequences += step_loglik.shape[0]

    def compute(self) -> Tensor:
        return (self.total / self.sequences.clamp_min(1)).float()
