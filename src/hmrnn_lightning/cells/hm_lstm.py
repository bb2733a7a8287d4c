"""HM-LSTM layer (eqs. 2-7)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hmrnn_lightning.cells.base import CellStep, HMCell, LayerState
from hmrnn_lightning.cells.operations import select_operations


class HMLSTMCell(HMCell):
    """One HM-LSTM layer for one step.

    ``f, i, o = sigm(.)``, ``g = tanh(.)`` on the slices of the pre-activation, then eq. 2:

    * UPDATE: ``c = f * c_{t-1} + i * g``
    * COPY:   ``c = c_{t-1}``, ``h = h_{t-1}``
    * FLUSH:  ``c = i * g`` (the cell forgets everything; the recurrent term
      ``U h_{t-1}`` of eq. 5 still enters the gates, as the paper writes it: eq. 5 is not
      gated, and the reset is the cell's. The HM-RNN, which has no cell, drops the term
      instead; see :class:`~hmrnn_lightning.cells.HMRNNCell`)

    and ``h = o * tanh(c)`` outside COPY (eq. 3); with layer norm ``h = o * tanh(LN(c))``.
    The mixing itself lives in :mod:`hmrnn_lightning.cells.operations`.

    Args:
        input_size: size of ``h^{l-1}``.
        hidden_size: size of ``h^l``.
        above_size: size of ``h^{l+1}``, None on the top layer.
        layer_norm: layer-normalise the pre-activation terms and the cell state.
    """

    num_gates = 4

    def __init__(self, input_size: int, hidden_size: int, above_size: int | None, layer_norm: bool = False) -> None:
        super().__init__(input_size, hidden_size, above_size, layer_norm)
        self.norm_cell = nn.LayerNorm(hidden_size) if layer_norm else nn.Identity()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        with torch.no_grad():  # forget-gate bias 1: a common LSTM default that helps early training
            self.bias[: self.hidden_size].fill_(1.0)

    def forward(self, h_below: Tensor, z_below: Tensor, state: LayerState, h_above: Tensor | None) -> CellStep:
        s = self.preactivation(h_below, z_below, state.h, state.z, h_above)
        ops = select_operations(z_below, state.z)
        c, h = hm_lstm_update(s, state.c, state.h, ops.update, ops.copy, ops.flush, self.norm_cell)
        return CellStep(h=h, c=c, boundary_logit=s[:, -1], ops=ops)


def hm_lstm_update(
    s: Tensor, c_prev: Tensor, h_prev: Tensor, update: Tensor, copy: Tensor, flush: Tensor, norm_cell: nn.Module
) -> tuple[Tensor, Tensor]:
    """Eqs. 2-3 for the LSTM: from the pre-activation ``s [batch, 4H + 1]`` and the operation
    weights (``[batch, 1]`` each) to the new ``(c, h)``: the specification, written apart
    from the fast paths' :mod:`~hmrnn_lightning.engine.pointwise` so that it can test them."""
    H = c_prev.shape[-1]
    f = torch.sigmoid(s[:, :H])
    i = torch.sigmoid(s[:, H : 2 * H])
    o = torch.sigmoid(s[:, 2 * H : 3 * H])
    g = torch.tanh(s[:, 3 * H : 4 * H])
    c = update * (f * c_prev + i * g) + flush * (i * g) + copy * c_prev
    h_new = o * torch.tanh(norm_cell(c))
    h = copy * h_prev + (1.0 - copy) * h_new  # keep_if_copy, inlined so the function compiles alone
    return c, h
