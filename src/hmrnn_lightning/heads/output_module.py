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
        if not embed_dim > 0:
            raise ValueError(f"embed_dim must be positive, got {embed_dim}")
        self.layer_sizes = [int(s) for s in layer_sizes]
        self.embed_dim = embed_dim
        # rows are w^l; eq. 11 has no bias, so neither does this
        self.gates = nn.Linear(sum(self.layer_sizes), len(self.layer_sizes), bias=False)
        self.project = nn.ModuleList(nn.Linear(s, embed_dim, bias=False) for s in self.layer_sizes)  # W^e_l

    def forward(self, hidden: list[Tensor]) -> Tensor:
        if len(hidden) != len(self.layer_sizes):
            raise ValueError(f"GatedOutputModule: got {len(hidden)} layers, built for {len(self.layer_sizes)}")
        return self.combine(hidden, [proj(h) for proj, h in zip(self.project, hidden)])

    def combine(self, hidden: list[Tensor], projections: list[Tensor]) -> Tensor:
        """Eq. 11-12 given the projections ``W^e_l h^l``."""
        g = torch.sigmoid(self.gates(torch.cat(hidden, dim=-1)))
        return torch.relu(sum(g[..., l : l + 1] * p for l, p in enumerate(projections)))

    @torch.no_grad()
    def step(self, hidden: list[Tensor], previous: list[Tensor] | None, copied: Tensor | None) -> tuple[Tensor, list[Tensor]]:
        """One generation step: ``hidden`` per layer ``[batch, hidden_l]``; ``copied``
        ``[batch, layers]`` is True where a layer copied its state, so ``W^e_l h^l`` is the
        ``previous`` projection and is not recomputed. Returns ``(h^e, projections)``."""
        projections = []
        for l, (proj, h) in enumerate(zip(self.project, hidden)):
            if previous is None or copied is None:
                projections.append(proj(h))
                continue
            rows = (~copied[:, l]).nonzero().squeeze(-1)
            if rows.numel() == h.shape[0]:
                projections.append(proj(h))
            elif rows.numel() == 0:
                projections.append(previous[l])
            else:
                projections.append(previous[l].index_copy(0, rows, proj(h.index_select(0, rows)).to(previous[l].dtype)))
        return self.combine(hidden, projections), projections
