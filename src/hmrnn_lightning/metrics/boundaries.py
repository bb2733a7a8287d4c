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


class SeparatorRates(Metric):
    """How often each layer fires on separator symbols (space, end of line) and on every other symbol.

    A layer that fires on most symbols but never on a separator scores near 0 word F1 and near
    the separators' complement in rate: it has learnt "the input is not a separator", the
    reverse polarity of a word detector. The two rates tell it apart from a layer that has
    learnt nothing. ``compute()`` returns ``boundary_rate_sep/l{k}`` and
    ``boundary_rate_other/l{k}`` (layers numbered from 1); a rate with no symbols of its kind
    seen (a text without separators) is left out.

    Args:
        num_layers: layers with a boundary detector.
        separator_ids: the symbol ids that are separators.
    """

    full_state_update = False

    def __init__(self, num_layers: int, separator_ids: list[int], **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_layers = num_layers
        self.register_buffer("separator_ids", torch.tensor(sorted(separator_ids), dtype=torch.long), persistent=False)
        for name in ("fired_sep", "fired_other"):
            self.add_state(name, default=torch.zeros(num_layers, dtype=torch.float64), dist_reduce_fx="sum")
        for name in ("n_sep", "n_other"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, boundaries: Tensor, inputs: Tensor) -> None:
        """Args: ``boundaries [batch, time, >= num_layers]`` (binarised at 0.5), ``inputs [batch, time]`` symbol ids."""
        z = (boundaries[..., : self.num_layers].detach() > 0.5).double()
        sep = torch.isin(inputs, self.separator_ids.to(inputs.device)).double().unsqueeze(-1)
        self.fired_sep += (z * sep).sum((0, 1))
        self.fired_other += (z * (1.0 - sep)).sum((0, 1))
        self.n_sep += sep.sum()
        self.n_other += (1.0 - sep).sum()

    def compute(self) -> dict[str, Tensor]:
        out = {}
        for l in range(self.num_layers):
            if self.n_sep > 0:
                out[f"boundary_rate_sep/l{l + 1}"] = (self.fired_sep[l] / self.n_sep).float()
            if self.n_other > 0:
                out[f"boundary_rate_other/l{l + 1}"] = (self.fired_other[l] / self.n_other).float()
        return out
