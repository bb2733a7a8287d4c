"""HM-LSTM layer (eqs. 2-7)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from hmrnn_lightning.cells.base import CellStep, HMCell, LayerState


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

    Two choices the paper leaves open are options, for ablations (the defaults are the
    choices argued in :class:`~hmrnn_lightning.cells.HMCell` and above; only the defaults run
    on the fast paths, other values on the reference loop):

    * ``norm_placement`` (with ``layer_norm``): ``bottom_up_and_cell`` normalises the
      bottom-up term and the cell; ``summed`` applies one layer norm to the summed
      pre-activation ``U h_{t-1} + z_{t-1} U' h^{l+1}_{t-1} + z^{l-1}_t W h^{l-1}_t`` (all
      ``4H + 1`` outputs, the boundary logit included) and adds the bias ``b`` after it, so
      the forget-gate bias of 1 survives; the cell is then not normalised (one norm only).
    * ``flush_recurrent``: ``True`` keeps ``U h_{t-1}`` in the gates on FLUSH (eq. 5 as
      written); ``False`` drops it, reading "FLUSH completely erases all the previous states"
      (section 3.1) literally, as the HM-RNN does. With soft (non-binary) boundaries the term
      is weighted by ``1 - flush``.

    Args:
        input_size: size of ``h^{l-1}``.
        hidden_size: size of ``h^l``.
        above_size: size of ``h^{l+1}``, None on the top layer.
        layer_norm: layer-normalise (where ``norm_placement`` says).
        norm_placement: ``bottom_up_and_cell`` (the bottom-up term and the cell) or
            ``summed`` (one norm on the summed pre-activation); needs ``layer_norm``.
        flush_recurrent: keep the recurrent term ``U h_{t-1}`` on FLUSH.
        flush_gradient: the straight-through gradient of ``z^l_{t-1}`` through the choice of
            operation (:class:`~hmrnn_lightning.cells.HMCell`).
        boundary_init: how the boundary unit's weights start (:class:`~hmrnn_lightning.cells.HMCell`).
    """

    num_gates = 4
    #: the values of ``norm_placement``; the first is the default
    NORM_PLACEMENTS = ("bottom_up_and_cell", "summed")

    def __init__(
        self, input_size: int, hidden_size: int, above_size: int | None, layer_norm: bool = False,
        norm_placement: Literal["bottom_up_and_cell", "summed"] = "bottom_up_and_cell", flush_recurrent: bool = True,
        flush_gradient: bool = True, boundary_init: Literal["uniform", "below_only"] = "uniform",
    ) -> None:
        if norm_placement not in self.NORM_PLACEMENTS:
            raise ValueError(f"{type(self).__name__}: norm_placement must be one of "
                             f"{', '.join(self.NORM_PLACEMENTS)}, got {norm_placement!r}")
        summed = norm_placement == "summed"
        if summed and not layer_norm:
            raise ValueError(f"{type(self).__name__}: norm_placement='summed' places a layer norm; it needs layer_norm=true")
        # the base builds the per-term norms; with one summed norm it builds none
        super().__init__(input_size, hidden_size, above_size, layer_norm and not summed, flush_gradient, boundary_init)
        self.layer_norm = layer_norm
        self.norm_placement = norm_placement
        self.flush_recurrent = bool(flush_recurrent)
        self.norm_summed = nn.LayerNorm(self.num_gates * hidden_size + 1) if summed else None
        self.norm_cell = nn.LayerNorm(hidden_size) if layer_norm and not summed else nn.Identity()

    @property
    def fast_path_problem(self) -> str | None:
        """Why the fast paths cannot run this cell (they implement the default options only), or None."""
        if self.norm_placement != self.NORM_PLACEMENTS[0]:
            return f"they implement norm_placement='{self.NORM_PLACEMENTS[0]}' only, not {self.norm_placement!r}"
        if not self.flush_recurrent:
            return "they keep the recurrent term on FLUSH (flush_recurrent=true) only"
        return None

    def extra_repr(self) -> str:
        options = "" if self.norm_placement == self.NORM_PLACEMENTS[0] else f", norm_placement={self.norm_placement!r}"
        return super().extra_repr() + options + ("" if self.flush_recurrent else ", flush_recurrent=False")

    def reset_parameters(self) -> None:
        super().reset_parameters()
        with torch.no_grad():  # forget-gate bias 1: a common LSTM default that helps early training
            self.bias[: self.hidden_size].fill_(1.0)

    def forward(self, h_below: Tensor, z_below: Tensor, state: LayerState, h_above: Tensor | None) -> CellStep:
        ops = self.operations(z_below, state.z)
        summed = self.norm_summed is not None
        recurrent, rest = self.preactivation_terms(h_below, z_below, state.h, state.z, h_above, bias=not summed)
        if not self.flush_recurrent:
            recurrent = (1.0 - ops.flush) * recurrent
        s = recurrent + rest
        if summed:
            s = self.norm_summed(s) + self.bias
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
