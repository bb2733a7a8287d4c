"""Precision, recall and F1 of each layer's boundaries against known segment ends."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric


def matched_pairs(pred: np.ndarray, true: np.ndarray, tolerance: int) -> int:
    """How many predictions can be paired one-to-one with true boundaries at most ``tolerance``
    steps away (a maximum matching): positions are sorted, so a two-pointer walk that pairs each
    true boundary with the earliest free prediction in its window finds the largest number."""
    i = j = matched = 0
    while i < len(pred) and j < len(true):
        if pred[i] < true[j] - tolerance:
            i += 1  # too early for this and every later true boundary
        elif true[j] < pred[i] - tolerance:
            j += 1  # nothing left near this true boundary
        else:
            matched, i, j = matched + 1, i + 1, j + 1
    return matched


class BoundaryF1(Metric):
    """Boundary quality of every layer (with a detector) against every level of known boundaries.

    Predicted and true boundaries are paired one-to-one, each pair at most ``tolerance`` steps
    apart, as many pairs as possible; precision = pairs / predictions, recall = pairs / true
    boundaries. One-to-one matters with a tolerance: a detector firing at ``t - 1``, ``t`` and
    ``t + 1`` around every true boundary gets one pair per true boundary, so its precision is
    about 1/3, not 1. Windows are scored on their own (a pair cannot straddle two windows).
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
        for name in ("matched", "predicted", "actual"):
            self.add_state(name, default=torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, z: Tensor, targets: Tensor) -> None:
        """Args: ``z [batch, time, >= num_layers]`` (binarised at 0.5), ``targets [batch, time, levels]``."""
        pred = z[..., : self.num_layers].detach() > 0.5
        true = targets.detach() > 0.5
        self.predicted += pred.sum((0, 1)).double().unsqueeze(1).expand(-1, len(self.levels))
        self.actual += true.sum((0, 1)).double().unsqueeze(0).expand(self.num_layers, -1)
        if self.tolerance == 0:  # pairs are the positions both mark
            self.matched += torch.einsum("btl,btk->lk", pred.double(), true.double())
            return
        pred_np, true_np = pred.cpu().numpy(), true.cpu().numpy()
        counts = np.zeros((self.num_layers, len(self.levels)))
        for b in range(pred_np.shape[0]):
            true_pos = [np.flatnonzero(true_np[b, :, k]) for k in range(len(self.levels))]
            for l in range(self.num_layers):
                pred_pos = np.flatnonzero(pred_np[b, :, l])
                for k, positions in enumerate(true_pos):
                    counts[l, k] += matched_pairs(pred_pos, positions, self.tolerance)
        self.matched += torch.as_tensor(counts, dtype=torch.float64, device=self.matched.device)

    def compute(self) -> dict[str, Tensor]:
        precision = self.matched / self.predicted.clamp_min(1)
        recall = self.matched / self.actual.clamp_min(1)
        f1 = 2 * precision * recall / (precision + recall).clamp_min(1e-12)
        out = {}
        for l in range(self.num_layers):
            for k, level in enumerate(self.levels):
                tag = f"l{l + 1}_{level}"
                out[f"boundary_precision/{tag}"] = precision[l, k].float()
                out[f"boundary_recall/{tag}"] = recall[l, k].float()
                out[f"boundary_f1/{tag}"] = f1[l, k].float()
        return out


class EndNeighbourRates(Metric):
    """How often each layer fires on the symbol just before, and just after, each known word end.

    Exact F1 and F1 within one step cannot tell a detector that fires one symbol late (on the
    first letter after a space: "after it sees a space", as the paper describes its Figure 3)
    from one that fires one symbol early, or from one that fires around every end. These two
    rates can. ``compute()`` returns ``boundary_rate_before_end/l{k}`` and
    ``boundary_rate_after_end/l{k}`` (layers numbered from 1). Windows are read on their own: an
    end at a window's first (last) step has no symbol before (after) it there and is not counted.

    Args:
        num_layers: layers with a boundary detector.
        level: which column of the known boundaries holds the word ends.
    """

    full_state_update = False

    def __init__(self, num_layers: int, level: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_layers, self.level = num_layers, level
        for name in ("fired_before", "fired_after"):
            self.add_state(name, default=torch.zeros(num_layers, dtype=torch.float64), dist_reduce_fx="sum")
        for name in ("n_before", "n_after"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, z: Tensor, targets: Tensor) -> None:
        """Args: ``z [batch, time, >= num_layers]`` (binarised at 0.5), ``targets [batch, time, levels]``."""
        fired = (z[..., : self.num_layers].detach() > 0.5).double()
        ends = (targets[..., self.level] > 0.5).double().unsqueeze(-1)
        self.fired_before += (fired[:, :-1] * ends[:, 1:]).sum((0, 1))
        self.n_before += ends[:, 1:].sum()
        self.fired_after += (fired[:, 1:] * ends[:, :-1]).sum((0, 1))
        self.n_after += ends[:, :-1].sum()

    def compute(self) -> dict[str, Tensor]:
        out = {}
        for l in range(self.num_layers):
            if self.n_before > 0:
                out[f"boundary_rate_before_end/l{l + 1}"] = (self.fired_before[l] / self.n_before).float()
            if self.n_after > 0:
                out[f"boundary_rate_after_end/l{l + 1}"] = (self.fired_after[l] / self.n_after).float()
        return out
