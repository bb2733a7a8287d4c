"""The HM-LSTM step as kernels: what one layer does at one step, once, for every fast path.

The reference cell (:class:`~hmrnn_lightning.cells.hm_lstm.HMLSTMCell`) is the specification
and stays independent of this module, as the test oracle. The fast paths split a step into
matrix products (the pre-activation terms) and one *pointwise* part, and this module holds
the pointwise part, forward and backward, in two forms that compute the same thing:

* PyTorch (:func:`pointwise_forward`, :func:`pointwise_backward`): used by the CPU sequence
  loop (:mod:`~hmrnn_lightning.cells.sequence`) and the CPU generation step
  (:mod:`~hmrnn_lightning.cells.generation`);
* Triton (:func:`triton_kernels`): one program per batch row, used by the GPU window
  (:mod:`~hmrnn_lightning.cells.triton_window`); tested against the reference loop through
  Triton's interpreter on CPU.

What the pointwise forward computes, per row (``s`` is the pre-activation, ``4H + 1`` wide;
``z_prev = z^l_{t-1}``, ``z_below = z^{l-1}_t``, 1 for the first layer)::

    f, i, o = sigm(s[:H]), sigm(s[H:2H]), sigm(s[2H:3H]);  g = tanh(s[3H:4H])
    u = (1 - z_prev) z_below        k = (1 - z_prev)(1 - z_below)      (FLUSH's weight is z_prev)
    c = (u f + k) c_prev + (u + z_prev) i g                            (eq. 2, regrouped)
    h = k h_prev + (1 - k) o tanh(N(c))                                (eq. 3; N: the cell's layer norm or identity)
    z = k z_prev + (1 - k) e,   e = estimator(s[4H])                   (:func:`carry_boundary`)

With binary weights COPY (``k = 1``) returns ``c_prev``, ``h_prev`` and ``z_prev`` bit for bit.
The top layer has no detector and its ``z`` is 0 (:data:`TOP_LAYER_Z`).

The backward is the chain rule of those lines; it returns ``ds`` (whose last column is the
boundary logit's gradient through the estimator's straight-through rule), ``dc_prev``, the
COPY part of ``dh_prev`` and the gradients of the three operation weights. The Triton
kernels also fold in the estimator (step, Bernoulli from given uniform noise, soft) and the
bottom-up term's layer norm, which the PyTorch form leaves to its caller.

The two window paths built on these forms, the CPU's :mod:`~hmrnn_lightning.cells.sequence`
and the GPU's :mod:`~hmrnn_lightning.cells.triton_window`, save the same tensors between
forward and backward: per layer and step the pre-activation ``s`` (overwritten in place by
``ds`` in the backward pass, then the left factor of the weight gradients), the gated inputs
of the merged product, ``c``, and with layer norm the bottom-up product before normalisation
(the GPU keeps ``h`` time-major as well; the CPU reads it from the outputs). The gates are taken
from ``s`` again.

The weights of a layer are laid out by :class:`LayerWeights`, and the merged product's inputs
by :class:`InputLayout`, each in one place.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from hmrnn_lightning.cells.base import LayerState, at_least_fp32

try:  # optional: the GPU path's kernels (pip install 'hmrnn-lightning[gpu]')
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = tl = None

#: The top layer has no boundary detector (paper, below eq. 7): its ``z`` is this constant.
TOP_LAYER_Z = 0.0


# --- the weight layout ------------------------------------------------------------------


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
        ``with_bottom_up`` (not for the first layer, whose input product is one over the whole
        window, nor with layer norm, which normalises that term on its own).
        :meth:`split_merged` undoes it for the gradient."""
        return torch.cat([getattr(self, f) for f in self._merged_fields(with_bottom_up)], dim=1)

    def _merged_fields(self, with_bottom_up: bool) -> list[str]:
        return ["recurrent"] + (["top_down"] if self.top_down is not None else []) + (["bottom_up"] if with_bottom_up else [])

    def split_merged(self, merged: Tensor, with_bottom_up: bool) -> dict[str, Tensor]:
        """``{field: block}`` of a tensor laid out as :meth:`merged`."""
        names = self._merged_fields(with_bottom_up)
        return dict(zip(names, merged.split([getattr(self, f).shape[1] for f in names], dim=1)))

    @property
    def layer_norm(self) -> bool:
        return self.cell_gamma is not None

    @classmethod
    def from_cell(cls, cell) -> "LayerWeights":
        """The parameters of an :class:`~hmrnn_lightning.cells.hm_lstm.HMLSTMCell` (the tensors
        themselves, so gradients reach the cell)."""
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
        """The roles that hold a tensor, in field order: the layout of :meth:`flatten`."""
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def flatten(self) -> list[Tensor]:
        return [getattr(self, n) for n in self.names()]

    @classmethod
    def unflatten(cls, names: list[str], flat: list[Tensor]) -> "LayerWeights":
        return cls(**dict(zip(names, flat)))


def layout_problem(cell) -> str | None:
    """Why :class:`LayerWeights` cannot hold ``cell``'s parameters, or None when it can: an
    :class:`~hmrnn_lightning.cells.hm_lstm.HMLSTMCell` (exactly: a subclass may change the
    step) that normalises the bottom-up term and the cell only, with affine layer norms, as
    the cells build them. Both fast paths take their weights through this layout."""
    from torch import nn

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


def matmul_dtype(x: Tensor) -> torch.dtype | None:
    """The autocast dtype for matrix products when autocast is on for ``x``'s device."""
    kind = x.device.type
    if kind in ("cpu", "cuda") and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return None


def flatten_layers(layers: list[LayerWeights]) -> tuple[list[list[str]], list[Tensor]]:
    """``(names per layer, all tensors in one list)``: how an autograd function takes them."""
    names = [w.names() for w in layers]
    return names, [t for w in layers for t in w.flatten()]


def unflatten_layers(names: list[list[str]], flat: list[Tensor]) -> list[LayerWeights]:
    out, i = [], 0
    for layer_names in names:
        out.append(LayerWeights.unflatten(layer_names, flat[i : i + len(layer_names)]))
        i += len(layer_names)
    return out


class InputLayout:
    """Where each block sits in a layer's merged input ``a_t = [h^l_{t-1}, z^l_{t-1} h^{l+1}_{t-1},
    z^{l-1}_t h^{l-1}_t]``, the left factor of the product with :meth:`LayerWeights.merged`. The last
    block is there only above the first layer and without layer norm (``with_bottom_up``); the
    top layer has no second block. Per layer: ``width``, and the first column of the ``above``
    and ``below`` blocks, ``above_start`` (which is also the width of ``h^l_{t-1}``) and
    ``below_start`` (:meth:`above_block`, :meth:`below_block` as slices)."""

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


# --- what a window function takes and returns ------------------------------------------------
# The window paths (sequence, triton_window, and cuda_graph's captures of the latter) are
# autograd functions over flat tensor lists; these say once how the state and the outputs lie there.


def flatten_states(states: list[LayerState]) -> list[Tensor]:
    """``(h, c, z)`` of each layer, one after the other, in one list."""
    return [t for s in states for t in (s.h, s.c, s.z)]


def unflatten_states(flat) -> list[LayerState]:
    """The inverse of :func:`flatten_states`."""
    return [LayerState(*flat[i : i + 3]) for i in range(0, len(flat), 3)]


def window_outputs(outs, layers: int) -> tuple[list[Tensor], Tensor, Tensor, list[LayerState]]:
    """A window function's flat outputs ``(*hidden, boundaries, logits, *final state)`` as
    ``(hidden per layer, boundaries, logits, final state)``."""
    return list(outs[:layers]), outs[layers], outs[layers + 1], unflatten_states(outs[layers + 2 :])


def first_layer_input(stack, x: Tensor, dtype: torch.dtype) -> Tensor:
    """The first layer's input as a window function takes it. Without layer norm, its input term
    ``W x``: one product over the window, here, which autograd differentiates. With layer norm,
    ``x`` itself: the function normalises the term and returns the gradient of ``x``, ``[B, T, E]``,
    rather than keep a ``[B, T, 4H + 1]`` one to the end of the backward pass."""
    first = stack.cells[0]
    return x.to(dtype) if first.layer_norm else at_least_fp32(first.bottom_up(x)).to(dtype)


# --- the rules, in PyTorch ----------------------------------------------------------------


def carry_boundary(copy: Tensor, z_prev: Tensor, estimate: Tensor) -> Tensor:
    """``z = k z_prev + (1 - k) e``: in COPY the detector is not re-evaluated and ``z`` is kept
    (it is 0 there, since COPY needs ``z_prev = 0``); elsewhere the estimator's decision."""
    return copy * z_prev + (1.0 - copy) * estimate


def gate_activations(s: Tensor, act: Tensor) -> None:
    """``f, i, o = sigm(s)``, ``g = tanh(s)`` into ``act`` ``[B, 4H]``."""
    H = act.shape[-1] // 4
    torch.sigmoid(s[:, : 3 * H], out=act[:, : 3 * H])
    torch.tanh(s[:, 3 * H : 4 * H], out=act[:, 3 * H :])


def layer_norm_rows(x: Tensor, gamma: Tensor, beta: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(LN(x), mean, 1/std)`` from the kernel ``nn.LayerNorm`` runs, so values match it bit for bit."""
    return torch.native_layer_norm(x, (x.shape[-1],), gamma, beta, eps)


def layer_norm_rows_backward(dy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, gamma: Tensor, beta: Tensor):
    """``(dx, dgamma, dbeta)`` of :func:`layer_norm_rows` (PyTorch's own backward kernel)."""
    return torch.ops.aten.native_layer_norm_backward(dy, x, (x.shape[-1],), mean, rstd, gamma, beta, [True, True, True])


def pointwise_forward(
    s: Tensor, c_prev: Tensor, h_prev: Tensor, u: Tensor, k: Tensor, zp: Tensor, act: Tensor, c_out: Tensor,
    h_out: Tensor, cell_norm: tuple[Tensor, Tensor, float] | None = None,
) -> None:
    """Gates and eqs. 2-3 into ``act`` ``[B, 4H]``, ``c_out`` and ``h_out``; with ``cell_norm``
    ``(gamma, beta, eps)``, ``h = o tanh(LN(c))``. ``u``, ``k``, ``zp`` are ``[B, 1]``.

    ``c = (u f + k) c_prev + (u + z_prev) i g`` is the reference's
    ``u (f c_prev + i g) + z_prev i g + k c_prev`` regrouped; with binary weights COPY
    (``k = 1``) still gives ``c_prev`` exactly, and ``lerp`` returns its end point exactly
    at weight 1, so ``h`` is copied bit for bit too."""
    H = c_prev.shape[-1]
    gate_activations(s, act)
    f, i, o, g = act[:, :H], act[:, H : 2 * H], act[:, 2 * H : 3 * H], act[:, 3 * H :]
    torch.addcmul(k, u, f, out=c_out)
    c_out.mul_(c_prev).addcmul_(i * g, u + zp)
    normed = c_out if cell_norm is None else layer_norm_rows(c_out, *cell_norm)[0]
    torch.lerp(torch.tanh(normed).mul_(o), h_prev, k, out=h_out)


def rowdot(a: Tensor, b: Tensor) -> Tensor:
    """``sum(a * b)`` over the last axis, kept as ``[B, 1]``."""
    return torch.linalg.vecdot(a, b).unsqueeze(-1)


def pointwise_backward(act, c_t, c_prev, h_prev, u, k, zp, dh, dc, ds, cell_norm=None):
    """The chain rule of :func:`pointwise_forward`: writes ``d s[:, :4H]`` into ``ds`` and returns
    ``(dc_prev, dh_prev, du, dk, dzp, d_norm)`` where ``dh_prev`` is only the part through
    COPY, ``dzp`` only the part through FLUSH (the caller adds the matrix-product parts), and
    ``d_norm`` the cell norm's ``(dgamma, dbeta)`` (None without ``cell_norm``)."""
    H = c_t.shape[-1]
    f, i, o, g = act[:, :H], act[:, H : 2 * H], act[:, 2 * H : 3 * H], act[:, 3 * H :]
    if cell_norm is None:
        tc = torch.tanh(c_t)
    else:
        normed, c_mean, c_rstd = layer_norm_rows(c_t, *cell_norm)
        tc = torch.tanh(normed)
    h_new = o * tc
    dh_new = (1.0 - k) * dh
    dk = rowdot(h_prev - h_new, dh)
    torch.mul(tc * dh_new, o * (1.0 - o), out=ds[:, 2 * H : 3 * H])  # output gate
    d_tanh_arg = o * dh_new * (1.0 - tc * tc)
    d_norm = None
    if cell_norm is None:
        dct = dc + d_tanh_arg
    else:
        gamma, beta, _ = cell_norm
        d_c, *d_norm = layer_norm_rows_backward(d_tanh_arg, c_t, c_mean, c_rstd, gamma, beta)
        dct = dc + d_c
    torch.mul(u * c_prev * dct, f * (1.0 - f), out=ds[:, :H])  # forget gate
    uz_dct = (u + zp) * dct
    torch.mul(uz_dct * g, i * (1.0 - i), out=ds[:, H : 2 * H])  # input gate
    torch.mul(uz_dct * i, 1.0 - g * g, out=ds[:, 3 * H : 4 * H])  # candidate
    dc_prev = torch.addcmul(k, u, f) * dct
    ig = i * g
    du = rowdot(torch.addcmul(ig, f, c_prev), dct)
    dzp = rowdot(ig, dct)  # FLUSH's weight is z_prev itself
    dk = dk + rowdot(c_prev, dct)
    return dc_prev, k * dh, du, dk, dzp, d_norm


# --- the same, as Triton kernels ------------------------------------------------------------

#: How the kernels decide ``e`` from the boundary logit (a compile-time switch).
GIVEN, STEP, BERNOULLI, SOFT = 0, 1, 2, 3


def estimator_mode(estimator) -> int | None:
    """The kernels' :data:`STEP` / :data:`BERNOULLI` / :data:`SOFT` for the built-in estimators
    (exact classes: a subclass may change the rule), None for any other (REINFORCE, plugins),
    which keep the PyTorch paths. A Bernoulli estimator in eval mode thresholds like the step."""
    from hmrnn_lightning.estimators import BernoulliEstimator, SoftEstimator, StepEstimator

    kind = type(estimator)
    if kind is StepEstimator:
        return STEP
    if kind is SoftEstimator:
        return SOFT
    if kind is BernoulliEstimator:
        return BERNOULLI if (estimator.training or estimator.sample_at_eval) else STEP
    return None


def triton_kernels():
    """``(forward, backward)``: the Triton kernels below. Both run one program per batch row over
    the whole row (``BLOCK`` is ``H`` rounded up to a power of two; the pre-activation is read
    as four ``H`` slices plus the boundary logit). Pointer arguments that a switch turns off are
    never read; pass any tensor. Triton reads ``TRITON_INTERPRET`` when this module is imported."""
    if triton is None:
        raise ImportError("the Triton kernels need Triton: pip install 'hmrnn-lightning[gpu]'")
    return step_forward, step_backward


if triton is not None:

    @triton.jit
    def _sigm(x):
        return 1.0 / (1.0 + tl.exp(-x))

    @triton.jit
    def _tanh(x):
        return 2.0 / (1.0 + tl.exp(-2.0 * x)) - 1.0

    @triton.jit
    def _load5(ptr, offs, mask, H: tl.constexpr):
        a = tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(ptr + H + offs, mask=mask, other=0.0).to(tl.float32)
        c = tl.load(ptr + 2 * H + offs, mask=mask, other=0.0).to(tl.float32)
        d = tl.load(ptr + 3 * H + offs, mask=mask, other=0.0).to(tl.float32)
        e = tl.load(ptr + 4 * H).to(tl.float32)
        return a, b, c, d, e

    @triton.jit
    def _store5(ptr, offs, mask, a, b, c, d, e, H: tl.constexpr):
        tl.store(ptr + offs, a, mask=mask)
        tl.store(ptr + H + offs, b, mask=mask)
        tl.store(ptr + 2 * H + offs, c, mask=mask)
        tl.store(ptr + 3 * H + offs, d, mask=mask)
        tl.store(ptr + 4 * H, e)

    @triton.jit
    def _norm5(x0, x1, x2, x3, x4, mask, eps, H: tl.constexpr):
        """Layer-norm statistics of a ``4H + 1`` row: ``(x^ per part, 1/std)``."""
        n = 4 * H + 1
        mean = (tl.sum(tl.where(mask, x0 + x1 + x2 + x3, 0.0), axis=0) + x4) / n
        d0 = tl.where(mask, x0 - mean, 0.0)
        d1 = tl.where(mask, x1 - mean, 0.0)
        d2 = tl.where(mask, x2 - mean, 0.0)
        d3 = tl.where(mask, x3 - mean, 0.0)
        d4 = x4 - mean
        var = (tl.sum(d0 * d0 + d1 * d1 + d2 * d2 + d3 * d3, axis=0) + d4 * d4) / n
        rstd = 1.0 / tl.sqrt(var + eps)
        return d0 * rstd, d1 * rstd, d2 * rstd, d3 * rstd, d4 * rstd, rstd

    @triton.jit
    def _norm_cell(c, mask, eps, H: tl.constexpr):
        mean = tl.sum(tl.where(mask, c, 0.0), axis=0) / H
        d = tl.where(mask, c - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / H + eps)
        return d * rstd, rstd

    @triton.jit
    def step_forward(
        s_ptr, below_ptr, base_ptr, gb_ptr, bb_ptr, c_prev_ptr, h_prev_ptr, zp_ptr, zb_ptr, gc_ptr,
        bc_ptr, given_ptr, slope_ptr, c_ptr, h_ptr, z_ptr, e_ptr, logit_ptr, own_ptr, own_stride, up_ptr, up_stride,
        down_ptr, down_stride, eps,
        H: tl.constexpr, BLOCK: tl.constexpr, HAS_BASE: tl.constexpr, BASE_ROWS: tl.constexpr,
        HAS_BELOW: tl.constexpr, BELOW_GATED: tl.constexpr, NORM_BELOW: tl.constexpr, NORM_CELL: tl.constexpr,
        TOP: tl.constexpr, MODE: tl.constexpr, WRITE_OWN: tl.constexpr, WRITE_UP: tl.constexpr,
        WRITE_DOWN: tl.constexpr,
    ):
        """``s`` holds the merged product ``a_t [U_l; U_{l+1}; W_{l-1}]^T`` of the gated inputs
        (``W_{l-1}`` only without layer norm) and, unless ``HAS_BASE``, the bias (plus the input
        term for a first layer without layer norm); with ``HAS_BASE`` the kernel adds ``base``
        (``[4H + 1]``, or one row per batch row with ``BASE_ROWS``). ``below`` is the raw
        bottom-up product where it is a term of its own (with layer norm). ``s`` gets the full
        pre-activation; writes ``c``, ``h``, ``z``, ``e`` and the boundary logit, and ``h`` into
        the inputs of the products that read it: its own next step's (``own``), the layer
        below's next step's, gated by ``z_below`` (``up``), and without layer norm the layer
        above's this step's, gated by the new ``z`` (``down``); each a block of rows of the
        given stride."""
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        mask = offs < H
        W = 4 * H + 1  # a compile-time constant, since H is one
        s0, s1, s2, s3, s4 = _load5(s_ptr + row * W, offs, mask, H)
        if HAS_BASE:
            if BASE_ROWS:
                q0, q1, q2, q3, q4 = _load5(base_ptr + row * W, offs, mask, H)
            else:
                q0, q1, q2, q3, q4 = _load5(base_ptr, offs, mask, H)
            s0 += q0
            s1 += q1
            s2 += q2
            s3 += q3
            s4 += q4
        zp = tl.load(zp_ptr + row).to(tl.float32)
        zb = 1.0
        if BELOW_GATED:
            zb = tl.load(zb_ptr + row).to(tl.float32)
        if HAS_BELOW:
            r0, r1, r2, r3, r4 = _load5(below_ptr + row * W, offs, mask, H)
            if NORM_BELOW:
                n0, n1, n2, n3, n4, _ = _norm5(r0, r1, r2, r3, r4, mask, eps, H)
                g0, g1, g2, g3, g4 = _load5(gb_ptr, offs, mask, H)
                b0, b1, b2, b3, b4 = _load5(bb_ptr, offs, mask, H)
                r0 = n0 * g0 + b0
                r1 = n1 * g1 + b1
                r2 = n2 * g2 + b2
                r3 = n3 * g3 + b3
                r4 = n4 * g4 + b4
            s0 += zb * r0
            s1 += zb * r1
            s2 += zb * r2
            s3 += zb * r3
            s4 += zb * r4
        _store5(s_ptr + row * W, offs, mask, s0, s1, s2, s3, s4, H)
        f = _sigm(s0)
        i = _sigm(s1)
        o = _sigm(s2)
        g = _tanh(s3)
        u = (1.0 - zp) * zb
        k = (1.0 - zp) * (1.0 - zb)
        c_prev = tl.load(c_prev_ptr + row * H + offs, mask=mask, other=0.0).to(tl.float32)
        h_prev = tl.load(h_prev_ptr + row * H + offs, mask=mask, other=0.0).to(tl.float32)
        c = (k + u * f) * c_prev + (u + zp) * (i * g)
        n = c
        if NORM_CELL:
            chat, _ = _norm_cell(c, mask, eps, H)
            n = chat * tl.load(gc_ptr + offs, mask=mask, other=0.0) + tl.load(bc_ptr + offs, mask=mask, other=0.0)
        h = k * h_prev + (1.0 - k) * (o * _tanh(n))
        tl.store(c_ptr + row * H + offs, c, mask=mask)
        tl.store(h_ptr + row * H + offs, h, mask=mask)
        if WRITE_OWN:
            tl.store(own_ptr + row * own_stride + offs, h, mask=mask)
        if WRITE_UP:
            tl.store(up_ptr + row * up_stride + offs, zb * h, mask=mask)
        if TOP:
            tl.store(z_ptr + row, zp * 0.0)  # TOP_LAYER_Z
        else:
            if MODE == 0:  # GIVEN
                e = tl.load(given_ptr + row).to(tl.float32)
            else:
                slope = tl.load(slope_ptr).to(tl.float32)
                p = tl.minimum(tl.maximum((slope * s4 + 1.0) * 0.5, 0.0), 1.0)
                if MODE == 1:  # STEP
                    e = tl.where(p > 0.5, 1.0, 0.0)
                elif MODE == 2:  # BERNOULLI, from uniform noise in [0, 1)
                    e = tl.where(tl.load(given_ptr + row).to(tl.float32) < p, 1.0, 0.0)
                else:  # SOFT
                    e = p
            tl.store(e_ptr + row, e)
            tl.store(logit_ptr + row, s4)
            z = k * zp + (1.0 - k) * e
            tl.store(z_ptr + row, z)
            if WRITE_DOWN:
                tl.store(down_ptr + row * down_stride + offs, z * h, mask=mask)

    @triton.jit
    def step_backward(
        s_ptr, below_ptr, gb_ptr, bb_ptr, dgb_ptr, dbb_ptr, c_ptr, c_prev_ptr, h_prev_ptr, h_ptr, zp_ptr, zb_ptr,
        e_ptr, slope_ptr, gc_ptr, bc_ptr, dgc_ptr, dbc_ptr, gh_ptr, dh_ptr, dc_ptr, dz_ptr, gz_ptr, glogit_ptr,
        drec_ptr, drec_stride, dxa_ptr, dxa_stride, dxb_ptr, dxb_stride, dzb_ptr, z_ptr, eps,
        H: tl.constexpr, BLOCK: tl.constexpr, HAS_BELOW: tl.constexpr, BELOW_GATED: tl.constexpr,
        NORM_BELOW: tl.constexpr, NORM_CELL: tl.constexpr, TOP: tl.constexpr, MODE: tl.constexpr,
        HAS_GH: tl.constexpr, HAS_GZ: tl.constexpr, HAS_GLOGIT: tl.constexpr, HAS_DREC: tl.constexpr,
        HAS_DXA: tl.constexpr, HAS_DXB: tl.constexpr,
    ):
        """One layer and step backwards. Reads the gradients that reached ``h``, ``c`` and ``z``:
        the ``dh``, ``dc``, ``dz`` accumulators, the outputs' gradients, and blocks of the
        products ``ds W`` of the steps that read ``h_t``: ``drec`` from its own next step's
        recurrent term, and two whose gate this row owns, ``dxa`` from the layer below's
        top-down term at the next step (gated by ``z_below``) and ``dxb`` from the layer above's
        bottom-up term without layer norm (gated by this layer's ``z``). Overwrites ``s`` with ``ds``, the bottom-up product (layer norm)
        with its gated gradient, ``dh`` with the COPY part of ``dh_prev``, ``dc`` with
        ``dc_prev``, ``dz`` with ``dz_prev`` (less the top-down gate's part, which the layer
        above adds through its ``dxa``), and adds ``dz_below`` into ``dzb``; the layer norms'
        parameter gradients add up per row."""
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        mask = offs < H
        W = 4 * H + 1  # a compile-time constant, since H is one
        s0, s1, s2, s3, s4 = _load5(s_ptr + row * W, offs, mask, H)
        zp = tl.load(zp_ptr + row).to(tl.float32)
        zb = 1.0
        if BELOW_GATED:
            zb = tl.load(zb_ptr + row).to(tl.float32)
        u = (1.0 - zp) * zb
        k = (1.0 - zp) * (1.0 - zb)
        f = _sigm(s0)
        i = _sigm(s1)
        o = _sigm(s2)
        g = _tanh(s3)
        h_t = tl.load(h_ptr + row * H + offs, mask=mask, other=0.0).to(tl.float32)
        dh = tl.load(dh_ptr + row * H + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_GH:
            dh += tl.load(gh_ptr + row * H + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_DREC:  # the next step's recurrent term read h_t
            dh += tl.load(drec_ptr + row * drec_stride + offs, mask=mask, other=0.0).to(tl.float32)
        dzb = 0.0
        if HAS_DXA:  # the layer below's top-down term read h_t, gated by z_below
            dxa = tl.load(dxa_ptr + row * dxa_stride + offs, mask=mask, other=0.0).to(tl.float32)
            dh += zb * dxa
            dzb += tl.sum(h_t * dxa, axis=0)
        dz = 0.0
        if not TOP:
            dz = tl.load(dz_ptr + row).to(tl.float32)
            if HAS_GZ:
                dz += tl.load(gz_ptr + row).to(tl.float32)
            if HAS_DXB:  # the layer above's bottom-up term read h_t, gated by this layer's z
                z_t = tl.load(z_ptr + row).to(tl.float32)
                dxb = tl.load(dxb_ptr + row * dxb_stride + offs, mask=mask, other=0.0).to(tl.float32)
                dh += z_t * dxb
                dz += tl.sum(h_t * dxb, axis=0)
        c_t = tl.load(c_ptr + row * H + offs, mask=mask, other=0.0).to(tl.float32)
        c_prev = tl.load(c_prev_ptr + row * H + offs, mask=mask, other=0.0).to(tl.float32)
        h_prev = tl.load(h_prev_ptr + row * H + offs, mask=mask, other=0.0).to(tl.float32)
        n = c_t
        if NORM_CELL:
            gc = tl.load(gc_ptr + offs, mask=mask, other=0.0)
            chat, c_rstd = _norm_cell(c_t, mask, eps, H)
            n = chat * gc + tl.load(bc_ptr + offs, mask=mask, other=0.0)
        tc = _tanh(n)
        h_new = o * tc
        dh_new = (1.0 - k) * dh
        dk = tl.sum(tl.where(mask, (h_prev - h_new) * dh, 0.0), axis=0)
        ds_o = tc * dh_new * o * (1.0 - o)
        d_n = o * dh_new * (1.0 - tc * tc)
        if NORM_CELL:
            dgc = tl.load(dgc_ptr + row * H + offs, mask=mask, other=0.0)
            dbc = tl.load(dbc_ptr + row * H + offs, mask=mask, other=0.0)
            tl.store(dgc_ptr + row * H + offs, dgc + d_n * chat, mask=mask)
            tl.store(dbc_ptr + row * H + offs, dbc + d_n, mask=mask)
            dxh = tl.where(mask, d_n * gc, 0.0)
            d_c = c_rstd * (dxh - tl.sum(dxh, axis=0) / H - chat * (tl.sum(dxh * chat, axis=0) / H))
        else:
            d_c = d_n
        dct = tl.load(dc_ptr + row * H + offs, mask=mask, other=0.0).to(tl.float32) + d_c
        ds_f = u * c_prev * dct * f * (1.0 - f)
        uz_dct = (u + zp) * dct
        ds_i = uz_dct * g * i * (1.0 - i)
        ds_g = uz_dct * i * (1.0 - g * g)
        ig = i * g
        du = tl.sum(tl.where(mask, (ig + f * c_prev) * dct, 0.0), axis=0)
        dzp = tl.sum(tl.where(mask, ig * dct, 0.0), axis=0)  # FLUSH's weight is z_prev itself
        dk += tl.sum(tl.where(mask, c_prev * dct, 0.0), axis=0)
        tl.store(dc_ptr + row * H + offs, (k + u * f) * dct, mask=mask)
        tl.store(dh_ptr + row * H + offs, k * dh, mask=mask)
        d_logit = 0.0
        if not TOP:
            e = tl.load(e_ptr + row).to(tl.float32)
            dzp += k * dz
            dk += (zp - e) * dz
            if MODE != 0:  # straight through the hard sigmoid: a / 2 where it is not clipped
                slope = tl.load(slope_ptr).to(tl.float32)
                q = (slope * s4 + 1.0) * 0.5
                inside = (q >= 0.0) & (q <= 1.0)
                d_logit = tl.where(inside, (1.0 - k) * dz * slope * 0.5, 0.0)
            if HAS_GLOGIT:
                d_logit += tl.load(glogit_ptr + row).to(tl.float32)
        if BELOW_GATED:
            dzp += -zb * du - (1.0 - zb) * dk
            dzb += (1.0 - zp) * (du - dk)
        else:
            dzp += -du
        tl.store(dz_ptr + row, dzp)
        _store5(s_ptr + row * W, offs, mask, ds_f, ds_i, ds_o, ds_g, d_logit, H)
        if HAS_BELOW:
            if NORM_BELOW:  # d LN(raw) = z_below ds; the gate's gradient is <LN(raw), ds>
                r0, r1, r2, r3, r4 = _load5(below_ptr + row * W, offs, mask, H)
                n0, n1, n2, n3, n4, rstd = _norm5(r0, r1, r2, r3, r4, mask, eps, H)
                g0, g1, g2, g3, g4 = _load5(gb_ptr, offs, mask, H)
                b0, b1, b2, b3, b4 = _load5(bb_ptr, offs, mask, H)
                if BELOW_GATED:
                    dzb += tl.sum(tl.where(mask, (n0 * g0 + b0) * ds_f + (n1 * g1 + b1) * ds_i
                                           + (n2 * g2 + b2) * ds_o + (n3 * g3 + b3) * ds_g, 0.0), axis=0)
                    dzb += (n4 * g4 + b4) * d_logit
                y0 = zb * ds_f
                y1 = zb * ds_i
                y2 = zb * ds_o
                y3 = zb * ds_g
                y4 = zb * d_logit
                q0, q1, q2, q3, q4 = _load5(dgb_ptr + row * W, offs, mask, H)
                _store5(dgb_ptr + row * W, offs, mask, q0 + y0 * n0, q1 + y1 * n1, q2 + y2 * n2, q3 + y3 * n3, q4 + y4 * n4, H)
                q0, q1, q2, q3, q4 = _load5(dbb_ptr + row * W, offs, mask, H)
                _store5(dbb_ptr + row * W, offs, mask, q0 + y0, q1 + y1, q2 + y2, q3 + y3, q4 + y4, H)
                x0 = tl.where(mask, y0 * g0, 0.0)
                x1 = tl.where(mask, y1 * g1, 0.0)
                x2 = tl.where(mask, y2 * g2, 0.0)
                x3 = tl.where(mask, y3 * g3, 0.0)
                x4 = y4 * g4
                nw = 4 * H + 1
                m1 = (tl.sum(x0 + x1 + x2 + x3, axis=0) + x4) / nw
                m2 = (tl.sum(x0 * n0 + x1 * n1 + x2 * n2 + x3 * n3, axis=0) + x4 * n4) / nw
                _store5(below_ptr + row * W, offs, mask, rstd * (x0 - m1 - n0 * m2), rstd * (x1 - m1 - n1 * m2),
                        rstd * (x2 - m1 - n2 * m2), rstd * (x3 - m1 - n3 * m2), rstd * (x4 - m1 - n4 * m2), H)
        if BELOW_GATED:
            tl.store(dzb_ptr + row, tl.load(dzb_ptr + row) + dzb)



def block_size(hidden: int) -> int:
    """The kernels' ``BLOCK``: ``hidden`` rounded up to a power of two."""
    return 1 << (int(hidden) - 1).bit_length()


def num_warps(hidden: int) -> int:
    """Warps per program: one program holds a few dozen row vectors of ``BLOCK`` floats (the
    backward with layer norm, most), so wider layers get more threads to keep them in
    registers: 4 up to ``H = 512``, 8 at 1024, 16 beyond."""
    return min(16, max(4, block_size(hidden) // 128))
