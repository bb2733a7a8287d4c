"""Interface shared by every HM cell: one layer, one time step."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from hmrnn_lightning.cells.operations import Operations


def at_least_fp32(t: Tensor) -> Tensor:
    """fp16 / bf16 (autocast outputs) up to fp32; fp32 and fp64 unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


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


class CellStep(NamedTuple):
    """What a cell returns for one step."""

    h: Tensor
    c: Tensor
    boundary_logit: Tensor  # z~ before the estimator, [batch]
    ops: Operations


class HMCell(nn.Module):
    """One HM layer. Subclasses define :attr:`num_gates` and :meth:`forward`.

    The pre-activation of eq. 4 is the sum of three terms (eqs. 5-7):
    ``s = U^l_l h^l_{t-1} + z^l_{t-1} U^l_{l+1} h^{l+1}_{t-1} + z^{l-1}_t W^l_{l-1} h^{l-1}_t + b``.
    Each term has ``num_gates * hidden + 1`` outputs; the last one is the boundary logit.
    With ``layer_norm`` every term is normalised on its own before the gate multiplies it
    (Ba et al. 2016 normalise the input and recurrent terms separately), so a gated-off
    term contributes exactly nothing.

    Args:
        input_size: size of ``h^{l-1}`` (the embedding for the first layer).
        hidden_size: size of ``h^l``.
        above_size: size of ``h^{l+1}``, or None for the top layer (no top-down term).
        layer_norm: normalise the pre-activation terms (and, in the HM-LSTM, the cell).
    """

    num_gates: int = 1

    def __init__(self, input_size: int, hidden_size: int, above_size: int | None, layer_norm: bool = False) -> None:
        super().__init__()
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size)):
            if int(value) <= 0:
                raise ValueError(f"{type(self).__name__}: {name} must be positive, got {value}")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.above_size = above_size
        self.layer_norm = layer_norm
        out = self.num_gates * hidden_size + 1
        self.recurrent = nn.Linear(hidden_size, out, bias=False)
        self.bottom_up = nn.Linear(input_size, out, bias=False)
        self.top_down = nn.Linear(above_size, out, bias=False) if above_size else None
        self.bias = nn.Parameter(torch.zeros(out))
        if layer_norm:
            self.norm_recurrent = nn.LayerNorm(out)
            self.norm_bottom_up = nn.LayerNorm(out)
            self.norm_top_down = nn.LayerNorm(out) if above_size else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = self.hidden_size**-0.5
        for lin in (self.recurrent, self.bottom_up, self.top_down):
            if lin is not None:
                nn.init.uniform_(lin.weight, -bound, bound)
        nn.init.zeros_(self.bias)

    def _term(self, linear: nn.Linear, x: Tensor, norm_name: str) -> Tensor:
        s = at_least_fp32(linear(x))  # elementwise maths in fp32 even under autocast
        if self.layer_norm:
            s = getattr(self, norm_name)(s)
        return s

    def preactivation_terms(
        self, h_below: Tensor, z_below: Tensor, h_prev: Tensor, z_prev: Tensor, h_above: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """Eq. 4's pre-activation split as ``(s^recurrent, s^top-down + s^bottom-up + b)``."""
        recurrent = self._term(self.recurrent, h_prev, "norm_recurrent")
        rest = self.bias + z_below.unsqueeze(-1) * self._term(self.bottom_up, h_below, "norm_bottom_up")
        if self.top_down is not None:
            if h_above is None:
                raise ValueError(f"{type(self).__name__}: this layer has a top-down term but got no h_above")
            rest = rest + z_prev.unsqueeze(-1) * self._term(self.top_down, h_above, "norm_top_down")
        return recurrent, rest

    def preactivation(
        self, h_below: Tensor, z_below: Tensor, h_prev: Tensor, z_prev: Tensor, h_above: Tensor | None
    ) -> Tensor:
        """Eq. 4's ``s^recurrent + s^top-down + s^bottom-up + b`` (before the nonlinearities)."""
        recurrent, rest = self.preactivation_terms(h_below, z_below, h_prev, z_prev, h_above)
        return recurrent + rest

    def initial_state(self, batch_size: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> LayerState:
        zeros = torch.zeros(batch_size, self.hidden_size, device=device, dtype=dtype)
        return LayerState(zeros, zeros.clone(), torch.zeros(batch_size, device=device, dtype=dtype))

    def forward(
        self, h_below: Tensor, z_below: Tensor, state: LayerState, h_above: Tensor | None
    ) -> CellStep:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (
            f"input_size={self.input_size}, hidden_size={self.hidden_size}, "
            f"above_size={self.above_size}, layer_norm={self.layer_norm}"
        )
