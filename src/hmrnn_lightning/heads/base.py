"""Interface of output heads."""

from __future__ import annotations

from torch import Tensor, nn


class Head(nn.Module):
    """Maps every layer's hidden states to a prediction, and scores targets.

    ``forward(hidden) -> out`` and ``nll(out, target) -> [batch, time]`` loss per step (nats).
    """

    def forward(self, hidden: list[Tensor]) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def nll(self, out: Tensor, target: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError
