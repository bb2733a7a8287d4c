"""What every backend reads: the weight layout (:class:`LayerWeights`, :class:`InputLayout`), the
:class:`WindowPlan` (built once per stack, device and product dtype; it holds the parameters
themselves, never copies) and the saved-tensor contract (:class:`WindowCache`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from torch import Tensor, nn

from hmrnn_lightning.states import LayerState

#: How the kernels decide ``e`` from the boundary logit (a compile-time switch): given
#: boundaries or uniform noise (``GIVEN``), or an estimator's rule by its ``kernel_mode`` name.
GIVEN, STEP, BERNOULLI, SOFT = 0, 1, 2, 3
KERNEL_MODES = {"step": STEP, "bernoulli": BERNOULLI, "soft": SOFT}


def kernel_mode(estimator: nn.Module) -> int | None:
    """The kernels' rule for ``estimator`` as it is now (its ``active_kernel_mode()``), None when
    they have none (REINFORCE, plugins, subclasses that do not declare one)."""
    active = getattr(estimator, "active_kernel_mode", None)
    return KERNEL_MODES.get(active()) if active is not None else None


def layout_problem(cell: nn.Module) -> str | None:
    """Why the fast paths cannot run ``cell``, or None when they can: they hold an
    :class:`~hmrnn_lightning.cells.hm_lstm.HMLSTMCell` (exactly: a subclass may change the step)
    that normalises the bottom-up term and the cell only, with affine layer norms, as the cells
    build them. The one check of its kind: every backend asks it."""
    from hmrnn_lightning.cells.hm_lstm import HMLSTMCell

    if type(cell) is not HMLSTMCell:
        return f"it runs HM-LSTM cells only, not {type(cell).__name__}"
    if cell.fast_path_problem is not None:  # an ablation option: the reference loop runs it
        return cell.fast_path_problem
    if cell.norm_recurrent is not None or cell.norm_top_down is not None:
        return "it normalises the bottom-up term and the cell only"
    if cell.layer_norm and not all(
        isinstance(n, nn.LayerNorm) and n.weight is not None and n.bias is not None
        for n in (cell.norm_bottom_up, cell.norm_cell)
    ):
        return "its layer norms need their affine weight and bias"
    return None


def fast_path_problem(cells: nn.ModuleList) -> str | None:
    """The first cell's :func:`layout_problem`, or None when every cell fits."""
    return next((p for p in map(layout_problem, cells) if p is not None), None)


def matmul_dtype(x: Tensor) -> torch.dtype | None:
    """The autocast dtype for matrix products when autocast is on for ``x``'s device."""
    kind = x.device.type
    if kind in ("cpu", "cuda") and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return None


@dataclass(frozen=True)
class LayerWeights:
    """The parameters of one HM-LSTM layer, by role, in ``[out, in]`` layout (``out = 4H + 1``).

    Attributes:
        recurrent: ``U^l_l`` ``[4H + 1, H]``.
        bottom_up: ``W^l_{l-1}`` ``[4H + 1, H_below]`` (the input embedding for the first layer).
        bias: ``b`` ``[4H + 1]``.
        top_down: ``U^l_{l+1}`` ``[4H + 1, H_above]``, None on the top layer.
        below_gamma, below_beta: the bottom-up term's layer norm, None without layer norm.
        cell_gamma, cell_beta: the cell's layer norm ``[H]``, None without layer norm.
    """

    recurrent: Tensor
    bottom_up: Tensor
    bias: Tensor
    top_down: Tensor | None = None
    below_gamma: Tensor | None = None
    below_beta: Tensor | None = None
    cell_gamma: Tensor | None = None
    cell_beta: Tensor | None = None

    @property
    def hidden_size(self) -> int:
        return self.recurrent.shape[1]

    def merged(self, with_bottom_up: bool) -> Tensor:
        """``[U_l; U_{l+1}; W_{l-1}]`` side by side, ``[4H + 1, K]``: one product for the terms
        that are not normalised, with their inputs gated before it (gating the input rows
        equals gating the product, since the terms are linear). ``W_{l-1}`` is in it only
        ``with_bottom_up`` (:class:`InputLayout`). :meth:`split_merged` undoes it."""
        return torch.cat([getattr(self, f) for f in self._merged_fields(with_bottom_up)], dim=1)

    def _merged_fields(self, with_bottom_up: bool) -> list[str]:
        return ["recurrent"] + (["top_down"] if self.top_down is not None else []) + (["bottom_up"] if with_bottom_up else [])

    def split_merged(self, merged: Tensor, with_bottom_up: bool) -> dict[str, Tensor]:
        """``{field: block}`` of a tensor laid out as :meth:`merged`."""
        names = self._merged_fields(with_bottom_up)
        return dict(zip(names, merged.split([getattr(self, f).shape[1] for f in names], dim=1)))

    @classmethod
    def from_cell(cls, cell: nn.Module) -> "LayerWeights":
        """The parameters of an HM-LSTM cell (the tensors themselves, so gradients reach it)."""
        norm_below = cell.norm_bottom_up
        return cls(
            recurrent=cell.recurrent.weight,
            bottom_up=cell.bottom_up.weight,
            bias=cell.bias,
            top_down=cell.top_down.weight if cell.top_down is not None else None,
            below_gamma=norm_below.weight if norm_below is not None else None,
            below_beta=norm_below.bias if norm_below is not None else None,
            cell_gamma=cell.norm_cell.weight if cell.layer_norm else None,
            cell_beta=cell.norm_cell.bias if cell.layer_norm else None,
        )

    def names(self) -> list[str]:
        """The roles that hold a tensor, in field order: the layout of the flat weight list."""
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]


class InputLayout:
    """Where each block sits in a layer's merged input ``a_t = [h^l_{t-1}, z^l_{t-1} h^{l+1}_{t-1},
    z^{l-1}_t h^{l-1}_t]``, the left factor of the product with :meth:`LayerWeights.merged`. The
    last block is there only above the first layer and without layer norm (``with_bottom_up``);
    the top layer has no second block. Per layer: ``width``, ``above_start`` (also the width of
    ``h^l_{t-1}``) and ``below_start``; :meth:`above_block`, :meth:`below_block` as slices."""

    def __init__(self, sizes: list[int], layer_norm: bool) -> None:
        L = len(sizes)
        self.with_bottom_up = [l > 0 and not layer_norm for l in range(L)]
        self.above_start = [sizes[l] for l in range(L)]
        self.below_start = [sizes[l] + (sizes[l + 1] if l + 1 < L else 0) for l in range(L)]
        self.width = [self.below_start[l] + (sizes[l - 1] if self.with_bottom_up[l] else 0) for l in range(L)]

    def above_block(self, l: int) -> slice:
        return slice(self.above_start[l], self.below_start[l])

    def below_block(self, l: int) -> slice:
        return slice(self.below_start[l], self.width[l])


def padded(width: int) -> int:
    """A buffer's row stride for rows ``width`` wide: rounded up to a multiple of 16, so every
    leading dimension the products touch is aligned, and so is every step's slot of a window's
    buffers (64 bytes in fp32, whatever the batch). A GPU's products want the aligned leading
    dimensions; on the CPU, MKL's product rounds by its operands' alignment, and a window split
    in two must equal one pass bit for bit. The pad columns are never read as data (the kernels
    mask them, the products see ``[:, :width]`` views)."""
    return (width + 15) // 16 * 16


def padded_row(hidden: int) -> int:
    """The row stride of the pre-activation buffers (``4H + 1`` wide), :func:`padded`."""
    return padded(4 * hidden + 1)


@dataclass
class WindowPlan:
    """Everything a backend needs to run a stack's window, built by :meth:`build`: per layer its
    :class:`LayerWeights` (the parameters themselves), hidden size, and each norm's own ``eps``
    (``below_eps``, ``cell_eps``; 0 without layer norm); the merged inputs' :class:`InputLayout`;
    whether the bottom-up term and the cell are normalised (every layer alike); whether
    ``z^l_{t-1}`` takes its gradient through the choice of operation (``flush_gradient``, the
    cells' option); the estimator module (the CPU backend calls it); the product dtype
    (autocast's, None for the state dtype); ``names``, the layout of the flat weight list."""

    layers: list[LayerWeights]
    sizes: list[int]
    layout: InputLayout
    layer_norm: bool
    below_eps: list[float]
    cell_eps: list[float]
    flush_gradient: bool
    estimator: nn.Module
    product_dtype: torch.dtype | None
    names: list[list[str]] = field(default_factory=list)
    identity: tuple = ()  # what the plan was built from (FastPaths rebuilds it when that changes)
    _products: tuple | None = field(default=None, repr=False)  # product_weights' inference cache

    @classmethod
    def build(cls, cells: nn.ModuleList, estimator: nn.Module, product_dtype: torch.dtype | None) -> "WindowPlan":
        layers = [LayerWeights.from_cell(cell) for cell in cells]
        layer_norm = bool(cells[0].layer_norm)
        sizes = [w.hidden_size for w in layers]
        return cls(
            layers=layers, sizes=sizes, layout=InputLayout(sizes, layer_norm), layer_norm=layer_norm,
            below_eps=[float(c.norm_bottom_up.eps) if layer_norm else 0.0 for c in cells],
            cell_eps=[float(c.norm_cell.eps) if layer_norm else 0.0 for c in cells], flush_gradient=cells[0].flush_gradient,
            estimator=estimator, product_dtype=product_dtype, names=[w.names() for w in layers],
        )

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def flat_weights(self) -> list[Tensor]:
        """Every layer's tensors in one list, as an autograd function takes them."""
        return [getattr(w, n) for w, names in zip(self.layers, self.names) for n in names]

    def unflatten_weights(self, flat: list[Tensor]) -> list[LayerWeights]:
        out, i = [], 0
        for names in self.names:
            out.append(LayerWeights(**dict(zip(names, flat[i : i + len(names)]))))
            i += len(names)
        return out

    def product_weights(self, layers: list[LayerWeights]) -> tuple[list[Tensor], list[Tensor]]:
        """Per layer the merged weight ``[4H + 1, K]`` and ``W_{l-1}`` ``[4H + 1, H_below]``, in the
        product dtype. Without gradients (sampling, one step per call) they are kept until a
        weight changes (its address or version): building them was a third of a step's calls."""
        key = None
        if not torch.is_grad_enabled():
            key = (self.product_dtype, *((t.data_ptr(), t._version) for w in layers for t in (w.recurrent, w.top_down, w.bottom_up) if t is not None))
            if self._products is not None and self._products[0] == key:
                return self._products[1]
        cast = (lambda w: w.to(self.product_dtype)) if self.product_dtype else (lambda w: w)
        products = [cast(w.merged(self.layout.with_bottom_up[l])) for l, w in enumerate(layers)], [cast(w.bottom_up) for w in layers]
        self._products = None if key is None else (key, products)
        return products

    def first_layer_input(self, x: Tensor, dtype: torch.dtype) -> Tensor:
        """The first layer's input as a window function takes it. Without layer norm its term
        ``W x``, one product over the window here, which autograd differentiates; with layer norm
        ``x`` itself (the function normalises the term and returns the gradient of ``x``, rather
        than keep a ``[B, T, 4H + 1]`` one to the end of the backward pass)."""
        if self.layer_norm:
            return x.to(dtype)
        term = torch.nn.functional.linear(x, self.layers[0].bottom_up)
        return (term.float() if term.dtype in (torch.float16, torch.bfloat16) else term).to(dtype)


# --- the flat state and outputs of a window function ------------------------------------------


def flatten_states(states: list[LayerState]) -> list[Tensor]:
    """``(h, c, z)`` of each layer, one after the other, in one list."""
    return [t for s in states for t in (s.h, s.c, s.z)]


def unflatten_states(flat) -> list[LayerState]:
    """The inverse of :func:`flatten_states`."""
    return [LayerState(*flat[i : i + 3]) for i in range(0, len(flat), 3)]


def window_outputs(outs, layers: int) -> tuple[list[Tensor], Tensor, Tensor, list[LayerState]]:
    """A window function's flat outputs ``(*hidden, boundaries, logits, *final state)`` as
    ``(hidden per layer [B, T, H], boundaries [B, T, L], logits [B, T, L - 1], final state)``:
    what every :class:`~hmrnn_lightning.engine.backend.Backend` returns."""
    return list(outs[:layers]), outs[layers], outs[layers + 1], unflatten_states(outs[layers + 2 :])


@dataclass
class WindowCache:
    """The saved-tensor contract between a window's forward and backward pass, for both backends;
    time-major (each step's slice contiguous; over the window a ``[T B, ...]`` view, the left factor
    of the weight gradients). Per layer: ``s`` ``[T, B, R]`` the pre-activations, overwritten by
    ``ds`` in the backward (``R`` = :func:`padded_row` on the Triton backend, ``4H + 1`` on the
    CPU's; the gates are taken from ``s`` again, not kept); ``inputs`` ``[T, B, K]`` the merged
    product's gated inputs; ``below`` (layer norm) ``[T, B, R]`` the bottom-up product before its
    norm, overwritten by its gradient; ``c`` ``[T, B, H]``; ``h`` ``[T, B, H]`` (Triton; the CPU
    reads the hidden outputs). ``z`` ``[T, L, B]`` (Triton; the CPU reads the boundaries output);
    ``e`` ``[T, L - 1, B]`` the estimator's decisions before COPY keeps ``z``; ``x_in`` the first
    layer's input (layer norm); ``graphs`` (CPU) ``(t, l) -> (logit leaf, e)``, each estimator
    call's own graph, differentiated per step so every estimator's gradient rule carries over.
    """

    s: list[Tensor]
    inputs: list[Tensor]
    below: list[Tensor | None]
    c: list[Tensor]
    e: Tensor
    h: list[Tensor] | None = None
    z: Tensor | None = None
    x_in: Tensor | None = None
    graphs: dict[tuple[int, int], tuple[Tensor, Tensor]] = field(default_factory=dict)
