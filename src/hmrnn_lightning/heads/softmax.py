"""Softmax over characters on the gated output module."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from hmrnn_lightning.heads.base import Head
from hmrnn_lightning.heads.output_module import GatedOutputModule


class SoftmaxHead(Head):
    """Next-symbol logits: ``Linear(ReLU(gated sum of h^l))`` (Fig. 2 right of the paper).

    Args:
        layer_sizes: hidden size of each stack layer (filled in by the model).
        vocab_size: number of symbols (filled in by the model).
        embed_dim: output embedding size (512 for PTB, 2048 for Text8/enwik8 in the paper).
    """

    def __init__(self, layer_sizes: list[int], vocab_size: int, embed_dim: int = 512) -> None:
        super().__init__()
        self.output_module = GatedOutputModule(layer_sizes, embed_dim)
        self.logits = nn.Linear(embed_dim, vocab_size)

    def forward(self, hidden: list[Tensor]) -> Tensor:
        return self.logits(self.output_module(hidden))

    def readout(self, embedding: Tensor) -> Tensor:
        return self.logits(embedding)

    def nll(self, out: Tensor, target: Tensor) -> Tensor:
        """Cross-entropy per step in nats, computed in fp32."""
        return F.cross_entropy(out.float().flatten(0, -2), target.flatten(), reduction="none").view(target.shape)
