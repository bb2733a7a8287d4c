"""Precision, recall and F1 of each layer's boundaries against known segment ends."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric


def _dilate(x: Tensor, tolerance: int) -> Tensor:
    """1 where ``x`` has a 1 within ``tolerance`` steps (along time, dim 1)."""
    if tolerance == 0:
        return x
    k = 2 * tolerance + 1
    return F.max_pool1d(x.transpose(1, 2), k, stride=1, padding=tolerance).transpose(1, 2)


class BoundaryF1(Metric):
    """Boundary quality of every layer (with a detector) against every level of known boundaries.

    A predicted boundary at ``t`` counts as correct when a true one lies in
    ``[t - tolerance, t + tolerance]``, and a true one as found when a prediction lies in that
    window. Precision = correct predictions / predictions; recall = found / true ones.
    ``compute()`` returns ``{"boundary_{precision,recall,f1}/l{k}_{level}": value}``.

    Args:
        num_layers: layers with a boundary detector.
        levels: names of the boundary levels (e.g. ``["word"]``).
        tolerance: allowed offset in steps (0 or 1 in practice).
    """

    full_state_update = False

    def __init__(self, num_layers: int, levels: list[str], tolerance: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_layers, self.levels, self.tolerance = num_layers, list(levels), tolerance
        shape = (num_layers, len(self.levels))
        for name in ("correct", "predicted", "found", "actual"):
            self.add_state(name, default=torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, z: Tensor, targets: Tensor) -> None:
        """Args: ``z [batch, time, >= num_layers]`` (binarised at 0.5), ``targets [batch, time, levels]``."""
        pred = (z[..., : self.num_layers].detach() > 0.5).float()
        true = targets.detach().float()
        pred_near, true_near = _dilate(pred, self.tolerance), _dilate(true, self.tolerance)
        # [layers, levels] counts via einsum over batch and time
        self.correct += torch.einsum("btl,btk->lk", pred, true_near).double()
        self.predicted += pred.sum((0, 1)).double().unsqueeze(1).expand(-1, len(self.levels))
        self.found += torch.einsum("btl,btk->lk", pred_near, true).double()
        self.actual += true.sum((0, 1)).double().unsqueeze(0).expand(self.num_layers, -1)

    def compute(self) -> dict[str, Tensor]:
        precision = self.correct / self.predicted.clamp_min(1)
        recall = self.found / self.actual.clamp_min(1)
        f1 = 2 * precision * recall / (precision + recall).clamp_min(1e-12)
        out = {}
        for l in range(self.num_layers):
            for k, level in enumerate(self.levels):
                tag = f"l{l + 1}_{level}"
                out[f"boundary_precision/{tag}"] = precision[l, k].float()
                out[f"boundary_recall/{tag}"] = recall[l, k].float()
                out[f"boundary_f1/{tag}"] = f1[l, k].float()
        return out
