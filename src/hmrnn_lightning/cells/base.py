"""Interface shared by every HM cell: one layer, one time step."""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from hmrnn_lightning.cells.operations import Operations, select_operations
from hmrnn_lightning.states import LayerState  # noqa: F401  (re-exported: the cells' state type)


def at_least_fp32(t: Tensor) -> Tensor:
    """fp16 / bf16 (autocast outputs) up to fp32; fp32 and fp64 unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


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

    Where layer norm applies (the paper says only "we also apply layer normalization"):
    with ``layer_norm`` the bottom-up term is normalised on its own before its gate
    multiplies it (so a gated-off term contributes exactly nothing), and the HM-LSTM
    normalises its cell; the recurrent and top-down terms, which read the previous step's
    states, are not normalised (:attr:`NORMALISED_TERMS`). The reason is measured, not
    taste: a layer norm's Jacobian scales with ``1 / std`` of its input whatever the weights,
    so every normalised term that reads the past is a loop gain of order one. An LSTM's
    forget path keeps such loops contractive; FLUSH cuts that path and restarts the cell
    from ``i * g``, which turns a flushing layer into a layer-normalised tanh RNN whose loop
    gain exceeds one. Normalising all three terms (as Ba et al. do for the LSTM's input and
    recurrent terms) made the gradient of a freshly initialised 3 x 128 stack grow about
    1.4x per step backwards: norm 1e13 at 100 steps (3e16 with every step a FLUSH, 7e15 at
    slope 5), against 0.45 (0.40, 0.91) with the bottom-up term and cell normalised alone.
    ``bench/gradient_growth.py`` repeats the measurement.

    Args:
        input_size: size of ``h^{l-1}`` (the embedding for the first layer).
        hidden_size: size of ``h^l``.
        above_size: size of ``h^{l+1}``, or None for the top layer (no top-down term).
        layer_norm: normalise the bottom-up term (and, in the HM-LSTM, the cell).
        flush_gradient: let the straight-through gradient reach ``z^l_{t-1}`` through the
            choice of operation at ``t`` (the paper's gradient); false cuts that path
            (:func:`~hmrnn_lightning.cells.operations.select_operations` says why).
        boundary_init: ``uniform`` (every weight alike, the usual start) or ``below_only``: the
            boundary unit's rows of the recurrent and top-down weights start at zero, so that at
            first the boundary logit reads the layer below (and the bias) only and the
            straight-through loop through FLUSH (``z^l_{t-1}`` -> ``h^l_t`` -> the logit of
            ``z^l_{t+1}``) has no gain; the rows learn from zero like any weight. Not in the
            paper; :class:`~hmrnn_lightning.cells.HMStack` sums up the measurements.
    """

    #: the values of ``boundary_init``; the first is the default
    BOUNDARY_INITS = ("uniform", "below_only")

    num_gates: int = 1
    #: with ``layer_norm``, the pre-activation terms that are normalised (see the class docstring)
    NORMALISED_TERMS: tuple[str, ...] = ("bottom_up",)

    def __init__(self, input_size: int, hidden_size: int, above_size: int | None, layer_norm: bool = False,
                 flush_gradient: bool = True, boundary_init: Literal["uniform", "below_only"] = "uniform") -> None:
        super().__init__()
        if boundary_init not in self.BOUNDARY_INITS:
            raise ValueError(f"{type(self).__name__}: boundary_init must be one of {', '.join(self.BOUNDARY_INITS)}, "
                             f"got {boundary_init!r}")
        self.boundary_init = boundary_init
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size)):
            if int(value) <= 0:
                raise ValueError(f"{type(self).__name__}: {name} must be positive, got {value}")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.above_size = above_size
        self.layer_norm = layer_norm
        self.flush_gradient = bool(flush_gradient)
        out = self.num_gates * hidden_size + 1
        self.recurrent = nn.Linear(hidden_size, out, bias=False)
        self.bottom_up = nn.Linear(input_size, out, bias=False)
        self.top_down = nn.Linear(above_size, out, bias=False) if above_size else None
        self.bias = nn.Parameter(torch.zeros(out))
        for term in ("recurrent", "top_down", "bottom_up"):
            normalised = layer_norm and term in self.NORMALISED_TERMS and getattr(self, term) is not None
            setattr(self, f"norm_{term}", nn.LayerNorm(out) if normalised else None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = self.hidden_size**-0.5
        for lin in (self.recurrent, self.bottom_up, self.top_down):
            if lin is not None:
                nn.init.uniform_(lin.weight, -bound, bound)
        nn.init.zeros_(self.bias)
        if self.boundary_init == "below_only":  # after the draws, so every other weight is as with `uniform`
            with torch.no_grad():
                for lin in (self.recurrent, self.top_down):
                    if lin is not None:
                        lin.weight[-1].zero_()  # the boundary unit is the last row

    def operations(self, z_below: Tensor, z_prev: Tensor) -> Operations:
        """Eq. 2's weights for this layer (:func:`~hmrnn_lightning.cells.operations.select_operations`)."""
        return select_operations(z_below, z_prev, self.flush_gradient)

    def term(self, name: str, x: Tensor) -> Tensor:
        """One pre-activation term before its gate: ``recurrent``, ``top_down`` or ``bottom_up``
        applied to ``x``, layer-normalised where :attr:`NORMALISED_TERMS` says so."""
        s = at_least_fp32(getattr(self, name)(x))  # elementwise maths in fp32 even under autocast
        norm = getattr(self, f"norm_{name}")
        return s if norm is None else norm(s)

    def preactivation_terms(
        self, h_below: Tensor, z_below: Tensor, h_prev: Tensor, z_prev: Tensor, h_above: Tensor | None,
        bias: bool = True,
    ) -> tuple[Tensor, Tensor]:
        """Eq. 4's pre-activation split as ``(s^recurrent, s^top-down + s^bottom-up + b)``;
        without ``bias`` the second part leaves ``b`` out (for a norm of the summed terms,
        which must not normalise the bias away)."""
        recurrent = self.term("recurrent", h_prev)
        below = z_below.unsqueeze(-1) * self.term("bottom_up", h_below)
        rest = self.bias + below if bias else below
        if self.top_down is not None:
            if h_above is None:
                raise ValueError(f"{type(self).__name__}: this layer has a top-down term but got no h_above")
            rest = rest + z_prev.unsqueeze(-1) * self.term("top_down", h_above)
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
        ) + ("" if self.flush_gradient else ", flush_gradient=False") + (
            "" if self.boundary_init == self.BOUNDARY_INITS[0] else f", boundary_init={self.boundary_init!r}")
