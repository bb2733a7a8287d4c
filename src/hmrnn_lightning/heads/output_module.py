"""The paper's output module (eqs. 11-12): gated sum of every layer's h."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class GatedOutputModule(nn.Module):
    """``g^l = sigm(w^l . [h^1; ...; h^L])``, ``h^e = ReLU(sum_l g^l W^e_l h^l)``.

    One scalar gate per layer and step decides how much that layer contributes to the
    output embedding.

    Args:
        layer_sizes: hidden size of each layer of the stack.
        embed_dim: size of the output embedding ``h^e``.
    """

    def __init__(self, layer_sizes: list[int], embed_dim: int) -> None:
        super().__init__()
        self.layer_sizes = [int(s) for s in layer_sizes]
        self.embed_dim = embed_dim
        self.gates = nn.Linear(sum(self.layer_sizes), len(self.layer_sizes))  # rows are w^l
        self.project = nn.ModuleList(nn.Linear(s, embed_dim, bias=False) for s in self.layer_sizes)  # W^e_l

    def forward(self, hidden: list[Tensor]) -> Tensor:
        if len(hidden) != len(self.layer_sizes):
            raise ValueError(f"GatedOutputModule: got {len(hidden)} layers, built for {len(self.layer_sizes)}")
        g = torch.sigmoid(self.gates(torch.cat(hidden, dim=-1)))
        mixed = sum(g[..., l : l + 1] * proj(h) for l, (proj, h) in enumerate(zip(self.project, hidden)))
        return torch.relu(mixed)
