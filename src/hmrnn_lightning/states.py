"""What a recurrent stack carries between steps and returns for a sequence.

Kept apart from :mod:`hmrnn_lightning.cells` so that the estimators (whose auxiliary losses
read a :class:`StackOutput`) and the engine can name these types without importing the cells.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from torch import Tensor


class LayerState(NamedTuple):
    """State of one layer after a step.

    Attributes:
        h: hidden state ``[batch, hidden]``.
        c: cell state ``[batch, hidden]`` (the HM-RNN, which has no cell, stores ``h`` here).
        z: boundary state ``[batch]``.
    """

    h: Tensor
    c: Tensor
    z: Tensor

    def detach(self) -> "LayerState":
        return LayerState(self.h.detach(), self.c.detach(), self.z.detach())


State = list[LayerState]


@dataclass
class StackOutput:
    """Everything a stack returns for a sequence.

    Attributes:
        hidden: per layer, ``h^l`` for every step, ``[batch, time, hidden_l]``.
        boundaries: ``z^l_t`` for every layer, ``[batch, time, layers]``; the top layer has
            no detector and its column is 0.
        boundary_logits: ``z~^l_t`` before the estimator, ``[batch, time, layers - 1]``.
        operations: weights of UPDATE, COPY, FLUSH, ``[batch, time, layers, 3]`` (one-hot
            for binary boundaries).
        state: the state after the last step, to initialise the next window.
    """

    hidden: list[Tensor]
    boundaries: Tensor
    boundary_logits: Tensor
    operations: Tensor
    state: State


def detach_state(state: State) -> State:
    """Cut the graph between truncated-BPTT windows."""
    return [s.detach() for s in state]
