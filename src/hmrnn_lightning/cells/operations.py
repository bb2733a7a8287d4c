"""The UPDATE / COPY / FLUSH rule of the HM-RNN (eq. 2 of the paper) in one place.

At step ``t`` layer ``l`` looks at two boundary states:

=====================  =====================  ===========
``z^l_{t-1}`` (own)    ``z^{l-1}_t`` (below)  operation
=====================  =====================  ===========
0                      1                      UPDATE
0                      0                      COPY
1                      any                    FLUSH
=====================  =====================  ===========

The choice is written as three weights that sum to one, so that the same code serves
binary boundaries (exactly one weight is 1) and the soft estimator (a convex mixture),
and so that the straight-through gradient reaches ``z`` through the products:

    flush  = z^l_{t-1}
    update = (1 - z^l_{t-1}) * z^{l-1}_t
    copy   = (1 - z^l_{t-1}) * (1 - z^{l-1}_t)

With binary weights ``copy * old + (1 - copy) * new`` returns ``old`` bit for bit
(``1 * x + 0 * y == x`` for finite ``y``), which is how COPY carries the state exactly.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

UPDATE, COPY, FLUSH = 0, 1, 2
OPERATION_NAMES = ("update", "copy", "flush")

#: The top layer has no boundary detector (paper, below eq. 7): its ``z`` is this constant, so
#: it never flushes. Every path reads it from here (the Triton kernels take it as an argument).
TOP_LAYER_Z = 0.0


class Operations(NamedTuple):
    """Per-row weights of the three operations, each of shape ``[batch, 1]``."""

    update: Tensor
    copy: Tensor
    flush: Tensor

    def stacked(self) -> Tensor:
        """``[batch, 3]`` in the order UPDATE, COPY, FLUSH."""
        return torch.cat([self.update, self.copy, self.flush], dim=-1)


def select_operations(z_below: Tensor, z_prev: Tensor, flush_gradient: bool = True) -> Operations:
    """Eq. 2's case analysis as weights.

    Args:
        z_below: ``z^{l-1}_t``, shape ``[batch]`` (all ones for the first layer), or any shape
            with ``z_prev``'s; the weights get a trailing axis of 1.
        z_prev: ``z^l_{t-1}``, shape ``[batch]``.
        flush_gradient: let the straight-through gradient reach ``z^l_{t-1}`` through these
            weights (whether the layer flushed). False takes ``z^l_{t-1}`` as a constant here
            (it still gets its gradient through COPY's carry and the top-down gate), an option
            the paper does not have. Why: that path is a loop, ``z^l_{t-1}`` -> ``c^l_t`` ->
            ``h^l_t`` -> the logit of ``z^l_t`` -> ..., whose gain per step is near one at
            initialisation, so in some seeds the gradient grows geometrically backwards in time:
            a fresh LayerNorm 3 x 128 stack on 100 PTB symbols had gradient norm 803 in seed 1
            and 11.7 in seed 3 (0.4-0.5 in seeds 0, 2, 4, 5), 0.41 and 0.39 with this path cut,
            0.40 with the same boundaries given as data. It is no cure for the blow-ups seen in
            training: without separators it held the seed that blew up (PTB, 1,200 steps) and
            another blew up instead; with separators layer 2 stopped finding the word ends
            (F1 0.000 against 0.910 and 0.951). The default keeps the paper's gradient (``docs/study.md``).
    """
    z_below = z_below.unsqueeze(-1)
    z_prev = z_prev.unsqueeze(-1) if flush_gradient else z_prev.detach().unsqueeze(-1)
    not_flush = 1.0 - z_prev
    return Operations(update=not_flush * z_below, copy=not_flush * (1.0 - z_below), flush=z_prev)


def keep_if_copy(ops: Operations, old: Tensor, new: Tensor) -> Tensor:
    """``old`` where the layer copies, ``new`` where it updates or flushes (eq. 3)."""
    return ops.copy * old + (1.0 - ops.copy) * new


def carry_boundary(copy: Tensor, z_prev: Tensor, estimate: Tensor) -> Tensor:
    """``z = k z_prev + (1 - k) e``: in COPY (weight ``k``) the detector is not re-evaluated,
    since nothing is recomputed, and ``z`` is kept (it is 0 there, as COPY needs ``z_prev = 0``);
    elsewhere the estimator's decision ``e``. Shapes broadcast (``[batch]`` or ``[batch, 1]``)."""
    return copy * z_prev + (1.0 - copy) * estimate


def operations_from_boundaries(boundaries: Tensor, first_z: Tensor) -> Tensor:
    """Eq. 2 for a whole sequence at once: the ``[batch, time, layers, 3]`` weights of
    UPDATE, COPY, FLUSH from the boundary states the stack produced.

    Args:
        boundaries: ``z^l_t``, ``[batch, time, layers]``.
        first_z: ``z^l_{-1}`` (the state the sequence started from), ``[batch, layers]``.
    """
    z_prev = torch.cat([first_z.unsqueeze(1), boundaries[:, :-1]], dim=1)
    z_below = torch.cat([torch.ones_like(boundaries[..., :1]), boundaries[..., :-1]], dim=-1)
    return select_operations(z_below, z_prev).stacked()
