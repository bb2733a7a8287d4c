"""Bits per character."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric


class BitsPerCharacter(Metric):
    """``sum(NLL in nats) / count / ln 2``, accumulated in float64 and summed across ranks.

    ``update(nll, mask=None)`` takes per-step losses in nats, any shape; ``mask`` (same
    shape, 0/1) leaves padded steps out.
    """

    full_state_update = False
    higher_is_better = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("nll_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, nll: Tensor, mask: Tensor | None = None) -> None:
        nll = nll.detach().double()
        if mask is not None:
            nll = nll * mask.double()
            self.count += mask.sum().long()
        else:
            self.count += nll.numel()
        self.nll_sum += nll.sum()

    def compute(self) -> Tensor:
        return (self.nll_sum / self.count.clamp_min(1) / math.log(2.0)).float()
