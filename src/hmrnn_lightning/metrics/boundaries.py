"""Per-layer boundary rate, the share of UPDATE, COPY and FLUSH, and how often boundaries do not nest."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from hmrnn_lightning.cells.operations import OPERATION_NAMES


class BoundaryStatistics(Metric):
    """Accumulates ``z`` and operation weights per layer.

    ``compute()`` returns a dict with keys ``boundary_rate/l{k}`` and ``{update,copy,flush}_frac/l{k}``
    (layers numbered from 1), and for ``k >= 2`` ``unnested/l{k}``: the share of steps where
    layer ``k`` ends a segment while layer ``k - 1`` does not. The paper's "updates instead of
    dense steps" claim is ``update_frac + flush_frac`` of an upper layer.

    Boundaries need not nest: after a FLUSH (``z^k_{t-1} = 1``) layer ``k`` computes, and its
    detector decides ``z^k_t``, whether or not the layer below ended a segment at ``t``. Only
    COPY carries ``z`` unchanged.

    Args:
        num_layers: layers of the stack.
    """

    full_state_update = False

    def __init__(self, num_layers: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_layers = num_layers
        self.add_state("z_sum", default=torch.zeros(num_layers, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("ops_sum", default=torch.zeros(num_layers, 3, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("unnested_sum", default=torch.zeros(num_layers, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("steps", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, boundaries: Tensor, operations: Tensor, mask: Tensor | None = None) -> None:
        """Args: ``boundaries [batch, time, layers]``, ``operations [batch, time, layers, 3]``,
        optional ``mask [batch, time]`` (1 on real steps, 0 on padding)."""
        if mask is None:
            mask = boundaries.new_ones(boundaries.shape[:2])
        m = mask.detach().double()
        self.z_sum += (boundaries.detach().double() * m.unsqueeze(-1)).sum(dim=(0, 1))
        self.ops_sum += (operations.detach().double() * m[..., None, None]).sum(dim=(0, 1))
        z = boundaries.detach().double()
        unnested = z[..., 1:] * (1.0 - z[..., :-1])  # fires while the layer below does not
        self.unnested_sum[1:] += (unnested * m.unsqueeze(-1)).sum(dim=(0, 1))
        self.steps += int(mask.sum())

    def compute(self) -> dict[str, Tensor]:
        n = self.steps.clamp_min(1).double()
        out = {}
        for l in range(self.num_layers):
            out[f"boundary_rate/l{l + 1}"] = (self.z_sum[l] / n).float()
            for k, name in enumerate(OPERATION_NAMES):
                out[f"{name}_frac/l{l + 1}"] = (self.ops_sum[l, k] / n).float()
            if l > 0:
                out[f"unnested/l{l + 1}"] = (self.unnested_sum[l] / n).float()
        return out
