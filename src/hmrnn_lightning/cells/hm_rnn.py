"""HM-RNN layer: the three operations on a plain tanh RNN."""

from __future__ import annotations

import torch
from torch import Tensor

from hmrnn_lightning.cells.base import CellStep, HMCell, LayerState


class HMRNNCell(HMCell):
    """One HM-RNN layer for one step.

    The paper defines the HM-RNN in general but only spells out the LSTM version. With no
    cell state, the operations are chosen as:

    * UPDATE: ``h = tanh(s^rec + s^top + s^bottom + b)``, an ordinary RNN step;
    * COPY:   ``h = h_{t-1}``;
    * FLUSH:  ``h = tanh(s^top + s^bottom + b)``: the recurrent term is dropped, because
      for an RNN the hidden state is the only memory and FLUSH is a hard reset of it.

    This differs on purpose from the HM-LSTM, whose FLUSH keeps ``U h_{t-1}`` in the gates as
    eq. 5 writes it: there the reset is ``c = i * g`` and ``h_{t-1}`` only steers the gates.
    Keeping the recurrent term here would make FLUSH the same computation as UPDATE, so the
    HM-RNN would have no reset at all.

    The boundary logit comes from the full pre-activation in both cases, as in eq. 4.
    ``LayerState.c`` holds a copy of ``h`` so that every cell has the same state shape.

    Args:
        input_size: size of ``h^{l-1}``.
        hidden_size: size of ``h^l``.
        above_size: size of ``h^{l+1}``, None on the top layer.
        layer_norm: layer-normalise each pre-activation term.
        flush_gradient, boundary_init: as :class:`~hmrnn_lightning.cells.HMCell`.
    """

    num_gates = 1

    def forward(self, h_below: Tensor, z_below: Tensor, state: LayerState, h_above: Tensor | None) -> CellStep:
        recurrent, rest = self.preactivation_terms(h_below, z_below, state.h, state.z, h_above)
        s = recurrent + rest
        ops = self.operations(z_below, state.z)
        h_update = torch.tanh(s[:, :-1])
        h_flush = torch.tanh(rest[:, :-1])
        h = ops.update * h_update + ops.flush * h_flush + ops.copy * state.h
        return CellStep(h=h, c=h, boundary_logit=s[:, -1], ops=ops)
