"""Interface of output heads."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hmrnn_lightning.cells.operations import COPY


class Head(nn.Module):
    """Maps every layer's hidden states to a prediction, and scores targets.

    ``forward(hidden) -> out`` and ``nll(out, target) -> [batch, time]`` loss per step (nats).
    """

    def forward(self, hidden: list[Tensor]) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def nll(self, out: Tensor, target: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def readout(self, embedding: Tensor) -> Tensor:
        """The last layer on top of the output module (heads built on it override this)."""
        raise NotImplementedError(f"{type(self).__name__} has no readout; step() falls back to forward()")

    @torch.no_grad()
    def step(self, output, cache=None):
        """One generation step on what :meth:`HMStack.step` returned (``hidden`` per layer
        ``[batch, 1, hidden_l]``): ``(out [batch, 1, ...], cache)``. Heads on the gated output
        module keep each layer's projection and recompute it only for rows that did not COPY."""
        module = getattr(self, "output_module", None)
        if module is None:
            return self(output.hidden), None
        hidden = [h[:, -1] for h in output.hidden]
        copied = output.operations[:, -1, :, COPY] == 1
        embedding, cache = module.step(hidden, cache, copied)
        return self.readout(embedding).unsqueeze(1), cache
