"""CPU path for HM-LSTM stacks: one autograd function for the whole window, backward by hand.

(Also what a GPU runs without Triton, or with an estimator the kernels lack; there it is dense.)

The reference loop (:class:`~hmrnn_lightning.cells.stack.HMStack`) lets autograd record
every small operation of every step. That is readable but slow: the backward pass then
computes each weight gradient as ``T`` thin products and walks tens of graph nodes per layer
and step. This module computes the same numbers with the backward written out by hand, in
the structure of the GPU path (:mod:`~hmrnn_lightning.cells.triton_window`): the same
products, the same saved tensors, the same backward decomposition. The two differ only where
a CPU and a GPU want different things (below).

Forward, per layer and step:

* one product of the gated inputs ``a_t = [h^l_{t-1}, z^l_{t-1} h^{l+1}_{t-1}, z^{l-1}_t h^{l-1}_t]``
  against the merged weight ``[U_l; U_{l+1}; W_{l-1}]`` (:meth:`LayerWeights.merged`; gating the
  input rows equals gating the terms, which are linear); where the blocks sit is
  :class:`~hmrnn_lightning.cells.hm_lstm_kernel.InputLayout`;
* with layer norm, the bottom-up term is normalised on its own
  (:class:`~hmrnn_lightning.cells.base.HMCell` says why only that one), so it leaves the merged
  product and is a second product, ``z^{l-1}_t LN(W_{l-1} h^{l-1}_t)``;
* the first layer's input term is one product over the whole window before the loop
  (without layer norm, outside the function, so autograd gives its weight gradient);
* the pointwise step (:func:`~hmrnn_lightning.cells.hm_lstm_kernel.pointwise_forward`).

Saved: per layer the pre-activation ``s`` of every step, the gated inputs ``a_t``, ``c``, and
with layer norm the bottom-up product before normalisation. The gates are not kept: the
backward pass takes them from ``s`` again (one sigmoid and tanh per step), and then
overwrites ``s`` in place with ``ds``, which is the left factor of the weight gradients.

Backward, per layer and step: the pointwise backward, then one product ``ds_t W_merged``
whose blocks are the gradients of the inputs (two products with layer norm: the normalised
term's layer-norm backward, then ``d raw W_{l-1}``). A gated term ``z W h`` has two gradients,
``z (ds W)`` for ``h`` and ``<h, ds W>`` for ``z`` (``<LN(W h), ds>`` where it is normalised).
The weight gradients are one product per weight over the window, ``dS^T A``.

Plain and layer norm. Since layer norm is on the bottom-up term alone (and the cell), the
two variants differ in that one term, so they share one loop, and the term's two forms are
each written once: in the forward :func:`_bottom_up_term` (and :func:`add_bottom_up` for
inference and generation), in the backward :func:`_bottom_up_backward`. The GPU kernels split
the same way (their ``HAS_BELOW`` / ``NORM_BELOW`` switches). Two separate loops, as libraries
do whose layer norm touches every term, would repeat everything else.

What is CPU-specific:

* rows whose contribution is zero are skipped (:data:`SKIP_GATED_ROWS`): in the forward the
  closed rows of a gated block of the merged product (their straight-through gradient is
  ``<h, ds W>`` and needs no forward product); in the backward the rows in COPY, whose ``ds``
  is 0. The normalised bottom-up term is computed for every row in training: its gradient
  for the gate is ``<LN(W h), ds>``, so the forward needs it even where the gate is closed.
  The GPU stays dense, so that it never waits on the host.
* the estimator module itself decides ``z`` (below), so any estimator without parameters
  runs here, REINFORCE and plugins included; the kernels have step, Bernoulli and soft built in.

The kept tensors have the GPU path's layout, time-major ``[T, B, ...]``: each step's slice is
contiguous, and over the window ``dS`` is a ``[T B, 4H + 1]`` view, the left factor of the
weight gradients. (Kept feature-major, ``[4H + 1, T, B]``, each step's slice is strided by
``T B`` and the pointwise work on it ran slower on 2 cores: sigmoid 310 us a call against 86 us,
and the whole step with layer norm slower.) The per-step products run as ``(W a^T)^T``, the
faster order for MKL at these shapes (:func:`merged_product`).

The forward cannot skip COPY rows in training: the straight-through gradient of the COPY
decision needs the ``h`` and ``c`` that an UPDATE would have produced. Generation, which needs
no gradient, does skip them (:mod:`hmrnn_lightning.cells.generation`).

The boundary estimator is called exactly as in the reference (same order, so the same
random draws); its own small graph from logit to ``z`` is kept and differentiated per step,
so every estimator's gradient rule (straight-through, soft, none for REINFORCE) carries
over unchanged. Estimators with trainable parameters would lose their gradients this way,
so :func:`supports` sends them to the other paths. ``tests/cells/test_fast_paths.py`` checks
every output and gradient against autograd on the reference loop.

Mixed precision: under autocast the matrix products run in the autocast dtype (bf16 on
CPU or GPU, fp16 on GPU) and everything else (states, gates, layer norm, boundary
decisions) in fp32.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from hmrnn_lightning.cells.base import LayerState
from hmrnn_lightning.cells.hm_lstm_kernel import (
    TOP_LAYER_Z, InputLayout, LayerWeights, carry_boundary, first_layer_input, flatten_layers, flatten_states,
    gate_activations, layer_norm_rows, layer_norm_rows_backward, layout_problem, matmul_dtype, pointwise_backward,
    pointwise_forward, rowdot, unflatten_layers, window_outputs,
)
from hmrnn_lightning.cells.operations import select_operations


#: Skip rows whose contribution is zero: in the forward pass the closed rows of the gated
#: blocks of the merged product (and in inference those of the normalised bottom-up term), in
#: the backward pass also the rows in COPY. None: on CPU only, where the forward skip measured
#: 10% and the two together 16% per stack step (PTB shape, 2 cores). Finding the rows reads
#: ``z`` on the host, which on a GPU would stall the stream once per layer and step.
SKIP_GATED_ROWS: bool | None = None


def supports(stack) -> bool:
    """HM-LSTM cells whose parameters :class:`LayerWeights` holds (:func:`layout_problem`) and
    an estimator without trainable parameters."""
    if any(p.requires_grad for p in stack.estimator.parameters()):
        return False
    return all(layout_problem(cell) is None for cell in stack.cells)


def sequence_forward(stack, x: Tensor, state: list[LayerState], boundaries: Tensor | None):
    """The body of :meth:`HMStack.forward` on this path.

    Returns ``(hidden, boundaries, logits, state)``: ``hidden`` per layer ``[B, T, H_l]``,
    ``boundaries`` ``[B, T, L]``, ``logits`` ``[B, T, L - 1]``, the final state.
    """
    mm_dtype = matmul_dtype(x)
    first = stack.cells[0]
    x_in = first_layer_input(stack, x, stack.state_dtype(x))
    layers = [LayerWeights.from_cell(cell) for cell in stack.cells]
    names, flat_weights = flatten_layers(layers)
    flat_state = flatten_states(state)
    skip = SKIP_GATED_ROWS if SKIP_GATED_ROWS is not None else x.device.type == "cpu"
    eps = first.norm_cell.eps if first.layer_norm else 0.0
    meta = _Meta(stack.estimator, boundaries, mm_dtype, len(layers), skip, names, eps)
    tensors = [x_in, *flat_weights, *flat_state]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        outs = _HMLSTMSequence.apply(meta, *tensors)
    else:
        with torch.no_grad(), torch.autocast(x_in.device.type, enabled=False):  # the products cast themselves
            outs, _ = _forward(meta, x_in, layers, flat_state, keep=False)
    return window_outputs(outs, len(layers))


class _Meta:
    """The non-tensor inputs of the autograd function."""

    def __init__(
        self, estimator, boundaries: Tensor | None, mm_dtype: torch.dtype | None, layers: int, skip_rows: bool,
        names: list[list[str]], eps: float,
    ) -> None:
        self.estimator = estimator
        self.boundaries = boundaries
        self.mm_dtype = mm_dtype
        self.layers = layers
        self.skip_rows = skip_rows
        self.names = names  # per layer, the LayerWeights fields in the flat argument list
        self.layer_norm = "cell_gamma" in names[0]
        self.eps = eps

    def unflatten(self, flat) -> list[LayerWeights]:
        return unflatten_layers(self.names, flat)


class _Saved:
    """What the backward pass reads beyond the function's inputs and outputs: the tensors the
    GPU path keeps too (its ``_Saved``), time-major."""

    def __init__(self) -> None:
        self.s: list[Tensor] = []  # per layer [T, B, 4H + 1]: the pre-activations, then ds
        self.inputs: list[Tensor] = []  # per layer [T, B, K]: the merged product's gated inputs a_t
        self.below: list[Tensor | None] = []  # with LN, per layer [T, B, 4H + 1]: the bottom-up product, then its gradient
        self.c: list[Tensor] = []  # per layer [T, B, H]
        self.estimates: Tensor | None = None  # e = estimator(logit) before COPY keeps z, [B, T, L - 1]
        self.graphs: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}  # (t, l) -> (logit leaf, e)


# --- products -------------------------------------------------------------------------------


def _matmul(a: Tensor, b: Tensor, mm_dtype: torch.dtype | None) -> Tensor:
    """``a @ b``; under autocast the product runs in ``mm_dtype`` and the result comes back in
    the state dtype (whichever operand is not already in ``mm_dtype``, else fp32)."""
    if mm_dtype is None:
        return a @ b
    out = a.dtype if a.dtype != mm_dtype else b.dtype
    out = torch.float32 if out == mm_dtype else out
    return (a.to(mm_dtype) @ b.to(mm_dtype)).to(out)


def _linear(a: Tensor, w: Tensor, mm_dtype: torch.dtype | None) -> Tensor:
    """``a @ w^T`` for a weight ``w`` in ``[out, in]`` layout, computed as ``(w @ a^T)^T``: with
    a batch of 64 rows that order ran 15-20% faster on a 2-core CPU (MKL) than ``a @ w^T``."""
    return _matmul(w, a.t(), mm_dtype).t()


def affine(bias: Tensor, a: Tensor, w: Tensor, mm_dtype: torch.dtype | None) -> Tensor:
    """``bias + a @ w^T``; ``bias`` is ``[out]`` or ``[batch, out]``."""
    if mm_dtype is None:
        return torch.addmm(bias.unsqueeze(-1) if bias.dim() == 1 else bias.t(), w, a.t()).t()
    return _linear(a, w, mm_dtype).add_(bias)


def _open_rows(gate: Tensor) -> Tensor:
    return gate.squeeze(-1).nonzero().squeeze(-1)


def gated_addmm_(s: Tensor, gate: Tensor, gated_x: Tensor, w: Tensor, mm_dtype) -> None:
    """``s += gated_x @ w^T`` where ``gated_x = gate * x``: rows whose gate is 0 are zero and
    are skipped."""
    rows = _open_rows(gate)
    if rows.numel() == s.shape[0]:
        s += _linear(gated_x, w, mm_dtype)
    elif rows.numel() > 0:
        s.index_add_(0, rows, _linear(gated_x.index_select(0, rows), w, mm_dtype))


def _rows_linear(d: Tensor, w_t: Tensor, rows: Tensor | None, mm_dtype) -> Tensor:
    """``d @ w_t^T`` where only ``rows`` of ``d`` can be non-zero (None: all rows)."""
    if rows is None or rows.numel() == d.shape[0]:
        return _linear(d, w_t, mm_dtype)
    out = d.new_zeros(d.shape[0], w_t.shape[0])
    if rows.numel() > 0:
        out.index_copy_(0, rows, _linear(d.index_select(0, rows), w_t, mm_dtype))
    return out


def merged_product(
    s: Tensor, base: Tensor, a: Tensor, w: Tensor, lay: InputLayout, l: int, zp: Tensor, zb: Tensor,
    skip_closed: bool, mm_dtype,
) -> None:
    """``s = base + a_t W_merged^T`` into ``s``; with ``skip_closed`` each gated block is
    multiplied for its open rows only (it is 0 on the others). The product is computed in
    :func:`_linear`'s order and copied into ``s``: on 2 cores, ``[64, 1024] x [1024, 2049]``
    took 2.03 ms that way, copy included, against 2.58 ms as a row-major product into ``s``."""
    if not skip_closed:
        s.copy_(affine(base, a, w, mm_dtype))
        return
    H = lay.above_start[l]  # h^l_{t-1} fills the columns before the gated blocks
    s.copy_(affine(base, a[:, :H], w[:, :H], mm_dtype))
    if l + 1 < len(lay.width):
        cols = lay.above_block(l)
        gated_addmm_(s, zp, a[:, cols], w[:, cols], mm_dtype)
    if lay.with_bottom_up[l]:
        cols = lay.below_block(l)
        gated_addmm_(s, zb, a[:, cols], w[:, cols], mm_dtype)


# --- the bottom-up term, where it is a term of its own (layer norm) --------------------------


def add_bottom_up(s: Tensor, w: LayerWeights, x: Tensor, gate: Tensor | None, eps: float, mm_dtype) -> None:
    """``s += gate * N(x W_{l-1}^T)`` for the rows whose gate is open (every row, ungated, when
    ``gate`` is None); ``N`` is the term's layer norm where the layer has one, else the identity.
    For inference and generation, where nothing is kept."""
    rows = None if gate is None else _open_rows(gate)
    if rows is not None:
        if rows.numel() == 0:
            return
        if rows.numel() == s.shape[0]:
            rows = None
    x_rows = x if rows is None else x.index_select(0, rows)
    term = _linear(x_rows, w.bottom_up, mm_dtype)
    if w.below_gamma is not None:
        term = layer_norm_rows(term.contiguous(), w.below_gamma, w.below_beta, eps)[0]
    if gate is not None:
        term = term * (gate if rows is None else gate.index_select(0, rows))
    if rows is None:
        s += term
    else:
        s.index_add_(0, rows, term)


def _bottom_up_term(s: Tensor, raw: Tensor, w: LayerWeights, gate: Tensor | None, eps: float) -> None:
    """``s += gate * LN(raw)`` for every row (``raw`` the product ``W_{l-1} h^{l-1}_t``, kept)."""
    term = layer_norm_rows(raw, w.below_gamma, w.below_beta, eps)[0]
    if gate is None:
        s += term
    else:
        s.addcmul_(term, gate)


def _bottom_up_backward(ds: Tensor, raw: Tensor, w: LayerWeights, gate: Tensor | None, eps: float):
    """The backward of :func:`_bottom_up_term`: ``(d raw, d gate or None, d gamma, d beta)``;
    ``d gate = <LN(raw), ds>``."""
    term, mean, rstd = layer_norm_rows(raw, w.below_gamma, w.below_beta, eps)
    d_raw, d_gamma, d_beta = layer_norm_rows_backward(
        ds if gate is None else ds * gate, raw, mean, rstd, w.below_gamma, w.below_beta
    )
    return d_raw, None if gate is None else rowdot(term, ds), d_gamma, d_beta


# --- the loop ---------------------------------------------------------------------------------


def _forward(meta: _Meta, x_in: Tensor, layers: list[LayerWeights], flat_state, keep: bool):
    """The time loop over ``x_in``: the first layer's input product ``[B, T, 4H + 1]`` without
    layer norm, the input itself ``[B, T, E]`` with it. Returns ``(outputs, saved)``: with
    ``keep``, ``saved`` is what the backward pass needs (a :class:`_Saved`, the estimator's
    graphs included); without, it is plain inference and ``saved`` is None."""
    L = meta.layers
    B, T, _ = x_in.shape
    dtype = x_in.dtype
    ln = meta.layer_norm
    mm = meta.mm_dtype
    sizes = [w.hidden_size for w in layers]
    lay = InputLayout(sizes, ln)
    cast = (lambda w: w.to(mm)) if mm else (lambda w: w)
    w_merged = [cast(w.merged(lay.with_bottom_up[l])) for l, w in enumerate(layers)]  # [4H + 1, K]
    w_below = [cast(w.bottom_up) for w in layers] if ln else None
    new = x_in.new_empty
    slots = T if keep else 1  # inference keeps one slot, overwritten step by step
    S = [new(slots, B, 4 * H + 1) for H in sizes]
    A = [new(slots, B, lay.width[l]) for l in range(L)]
    C = [new(T, B, H) for H in sizes] if keep else None
    act = [new(B, 4 * H) for H in sizes]  # the gates, scratch
    hidden = [new(B, T, H) for H in sizes]
    z_all = x_in.new_zeros(B, T, L)
    logits = new(B, T, L - 1)
    R: list[Tensor | None] = [None] * L
    if ln:
        # the first layer's input term: one product over the window, [T, B, 4H + 1] (kept whole,
        # in inference too: it is computed before the loop)
        x_tm = x_in.transpose(0, 1).reshape(T * B, -1)
        R[0] = _matmul(x_tm, w_below[0].t(), mm).view(T, B, -1)
        for l in range(1, L):
            R[l] = new(slots, B, 4 * sizes[l] + 1)
        xb = None
    else:
        xb = (x_in + layers[0].bias).transpose(0, 1)  # [T, B, 4H + 1]: the first layer's base
    saved = _Saved() if keep else None
    if keep:
        saved.estimates = new(B, T, L - 1)
    h, c, z = list(flat_state[0::3]), list(flat_state[1::3]), list(flat_state[2::3])  # advanced step by step
    ones = torch.ones(B, 1, dtype=dtype, device=x_in.device)
    zeros = torch.full((B,), TOP_LAYER_Z, dtype=dtype, device=x_in.device)
    for t in range(T):
        slot = t if keep else 0
        zb = ones  # z^0_t: the input always "ends a segment"
        for l in range(L):
            w = layers[l]
            H = sizes[l]
            zp = z[l].unsqueeze(-1)
            a, s = A[l][slot], S[l][slot]
            a[:, :H] = h[l]
            if l + 1 < L:
                torch.mul(h[l + 1], zp, out=a[:, lay.above_block(l)])  # layer l+1 is still at t-1
            if lay.with_bottom_up[l]:
                torch.mul(h[l - 1], zb, out=a[:, lay.below_block(l)])
            base = xb[t] if xb is not None and l == 0 else w.bias
            merged_product(s, base, a, w_merged[l], lay, l, zp, zb, meta.skip_rows, mm)
            if ln:
                if l == 0:
                    _bottom_up_term(s, R[0][t], w, None, meta.eps)
                elif keep or not meta.skip_rows:  # training needs every row (the module's docstring)
                    raw = R[l][slot].copy_(_linear(h[l - 1], w_below[l], mm))
                    _bottom_up_term(s, raw, w, zb, meta.eps)
                else:
                    add_bottom_up(s, w, h[l - 1], zb, meta.eps, mm)
            ops = select_operations(zb.squeeze(-1), z[l])
            u, k = ops.update, ops.copy
            c_new = C[l][t] if keep else torch.empty_like(c[l])
            cell_norm = (w.cell_gamma, w.cell_beta, meta.eps) if ln else None
            pointwise_forward(s, c[l], h[l], u, k, zp, act[l], c_new, hidden[l][:, t], cell_norm)
            if l + 1 < L:
                logit = s[:, 4 * H]
                logits[:, t, l] = logit
                if meta.boundaries is not None:
                    e = meta.boundaries[:, t, l].to(dtype)
                elif keep:
                    with torch.enable_grad():
                        # a copy: the logit lives in S, which later steps overwrite in place,
                        # and an estimator may keep its input for its backward (clamp does)
                        leaf = logit.detach().clone().requires_grad_()
                        e_graph = meta.estimator(leaf)
                    e = e_graph.detach().to(dtype)
                    if e_graph.requires_grad:
                        saved.graphs[(t, l)] = (leaf, e_graph)
                else:
                    e = meta.estimator(logit).to(dtype)
                if keep:
                    saved.estimates[:, t, l] = e
                z_new = carry_boundary(k.squeeze(-1), z[l], e)
            else:
                z_new = zeros
            z_all[:, t, l] = z_new
            h[l], c[l], z[l] = hidden[l][:, t], c_new, z_new
            zb = z_new.unsqueeze(-1)
    final = [x for l in range(L) for x in (h[l].clone(), c[l].clone(), z[l].clone())]
    if keep:
        saved.s, saved.inputs, saved.below, saved.c = S, A, R, C
    return (*hidden, z_all, logits, *final), saved


class _HMLSTMSequence(torch.autograd.Function):
    """Inputs: meta, x_in (see :func:`_forward`), each layer's :class:`LayerWeights` flattened,
    (h, c, z) per layer. Outputs: L hidden sequences, boundaries, logits, (h, c, z) per
    layer."""

    @staticmethod
    def forward(ctx, meta: _Meta, x_in: Tensor, *rest: Tensor):  # type: ignore[override]
        L = meta.layers
        n = sum(len(names) for names in meta.names)
        flat_weights, flat_state = list(rest[:n]), list(rest[n:])
        with torch.autocast(x_in.device.type, enabled=False):
            outs, saved = _forward(meta, x_in, meta.unflatten(flat_weights), flat_state, keep=True)
        ctx.meta, ctx.saved, ctx.num_weights = meta, saved, n
        # only the LayerNorm path reads x_in again (its input term's weight gradient); without
        # LN it is x_proj, [B, T, 4H + 1]: keeping it raised the Text8 shape's peak from 4,025 to 4,305 MB
        ctx.save_for_backward(x_in if meta.layer_norm else None, *flat_weights, *flat_state, *outs[:L], outs[L])
        return outs

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: Tensor):  # type: ignore[override]
        meta, saved, n = ctx.meta, ctx.saved, ctx.num_weights
        L = meta.layers
        x_in, *rest = ctx.saved_tensors
        layers = meta.unflatten(rest[:n])
        flat_state = rest[n : n + 3 * L]
        hidden = rest[n + 3 * L : n + 4 * L]
        z_all = rest[n + 4 * L]
        with torch.autocast(z_all.device.type, enabled=False):
            out = _backward(meta, saved, x_in, layers, flat_state, hidden, z_all, grads)
        ctx.saved = None  # free the stored activations now, not when the graph goes
        return (None, *out)


def _zero_if_none(g: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if g is None else g


def _backward(meta: _Meta, saved: _Saved, x_in: Tensor | None, layers: list[LayerWeights], flat_state, hidden, z_all, grads):
    L = meta.layers
    B, T, _ = z_all.shape
    ln = meta.layer_norm
    mm = meta.mm_dtype
    sizes = [w.hidden_size for w in layers]
    lay = InputLayout(sizes, ln)
    cast = (lambda w: w.to(mm)) if mm else (lambda w: w)
    # [in, out] layouts: the inputs' gradients d @ W = _linear(d, W^T), in the faster order
    w_merged_t = [cast(w.merged(lay.with_bottom_up[l])).t().contiguous() for l, w in enumerate(layers)]
    w_below_t = [cast(w.bottom_up).t().contiguous() for w in layers] if ln else None
    S, A, R, C = saved.s, saved.inputs, saved.below, saved.c
    g_hidden = [_zero_if_none(grads[l], hidden[l]) for l in range(L)]
    g_z = _zero_if_none(grads[L], z_all)
    g_logits = grads[L + 1]
    g_final = grads[L + 2 :]
    h0, c0, z0 = flat_state[0::3], flat_state[1::3], flat_state[2::3]
    # gradients arriving at (h, c, z) of each layer from the step after (or the final state)
    dh_next = [_zero_if_none(g_final[3 * l], h0[l]) for l in range(L)]
    dc_next = [_zero_if_none(g_final[3 * l + 1], c0[l]) for l in range(L)]
    dz_next = [_zero_if_none(g_final[3 * l + 2], z0[l]).unsqueeze(-1) for l in range(L)]
    dz_next[L - 1] = torch.zeros_like(dz_next[L - 1])  # the top layer's z is the constant 0
    d_norms = [{k: torch.zeros_like(getattr(w, k)) for k in ("below_gamma", "below_beta", "cell_gamma", "cell_beta")}
               if ln else None for w in layers]
    act = [z_all.new_empty(B, 4 * H) for H in sizes]
    live = [torch.ones(T, B, dtype=torch.bool, device=z_all.device) for _ in range(L)]  # ds row not 0
    ones = z_all.new_ones(B)
    for t in range(T - 1, -1, -1):
        dh_from_above = dz_from_above = None  # d h^l_t, d z^l_t through layer l+1's bottom-up term
        for l in range(L - 1, -1, -1):
            w = layers[l]
            H = sizes[l]
            top = l + 1 == L
            h_prev = hidden[l][:, t - 1] if t > 0 else h0[l]
            c_prev = C[l][t - 1] if t > 0 else c0[l]
            ops = select_operations(z_all[:, t, l - 1] if l > 0 else ones, z_all[:, t - 1, l] if t > 0 else z0[l])
            u, k, zp = ops.update, ops.copy, ops.flush
            zb = z_all[:, t, l - 1 : l] if l > 0 else None
            # d h^l_t gathers from the loss; from layer l at t+1 (its recurrent term and COPY) and
            # layer l-1 at t+1 (its top-down term), both already in dh_next; and from layer l+1 at
            # t (its bottom-up term, dh_from_above). d z^l_{t-1} (dzp below) gathers from FLUSH,
            # COPY's carry, u and k, and the top-down term's gate.
            dh = g_hidden[l][:, t] + dh_next[l]
            if dh_from_above is not None:
                dh = dh + dh_from_above
            ds = S[l][t]  # still s here: pointwise_backward overwrites it with ds
            gate_activations(ds, act[l])  # the gates, from s
            cell_norm = (w.cell_gamma, w.cell_beta, meta.eps) if ln else None
            dc_next[l], dh_prev, du, dk, dzp, d_norm = pointwise_backward(
                act[l], C[l][t], c_prev, h_prev, u, k, zp, dh, dc_next[l], ds, cell_norm
            )
            if d_norm is not None:
                d_norms[l]["cell_gamma"] += d_norm[0]
                d_norms[l]["cell_beta"] += d_norm[1]
            d_logit = None
            if not top:
                dz = g_z[:, t, l : l + 1] + dz_next[l]
                if dz_from_above is not None:
                    dz = dz + dz_from_above
                e = saved.estimates[:, t, l : l + 1]
                dzp = dzp + k * dz
                dk = dk + (zp - e) * dz
                graph = saved.graphs.get((t, l))
                if graph is not None:
                    leaf, e_graph = graph
                    (d_logit,) = torch.autograd.grad(e_graph, leaf, ((1.0 - k) * dz).squeeze(-1).to(e_graph.dtype))
                if g_logits is not None:
                    d_logit = g_logits[:, t, l] if d_logit is None else d_logit + g_logits[:, t, l]
            ds[:, 4 * H] = 0.0 if d_logit is None else d_logit
            # u = (1 - z_prev) z_below, k = (1 - z_prev)(1 - z_below)
            if l > 0:
                dzp = dzp - zb * du - (1.0 - zb) * dk
                dzb = (1.0 - zp) * (du - dk)
            else:
                dzp = dzp - du
            # the products keep the closed rows of a gated term: they still need them, for the
            # straight-through gradient of the boundary that closed them. Rows in COPY have
            # ds = 0 exactly (every gate term carries a factor u, u + z_prev or 1 - k), so
            # unless something outside gave their logit a gradient they are left out.
            rows = None
            if meta.skip_rows and l > 0:
                live[l][t] = (k.squeeze(-1) != 1) | (ds[:, 4 * H] != 0)
                rows = live[l][t].nonzero().squeeze(-1)
            da = _rows_linear(ds, w_merged_t[l], rows, mm)  # ds W_merged: the inputs' gradients, ungated
            dh_prev = dh_prev + da[:, :H]
            if not top:  # the top-down term read h^{l+1}_{t-1}, gated by z^l_{t-1}
                cols = lay.above_block(l)
                h_above = hidden[l + 1][:, t - 1] if t > 0 else h0[l + 1]
                dh_next[l + 1] = dh_next[l + 1] + zp * da[:, cols]  # layer l+1 at step t is done
                dzp = dzp + rowdot(h_above, da[:, cols])
            # the bottom-up term, gated by z^{l-1}_t: in the merged product without layer norm,
            # normalised on its own with it (for the first layer, the ungated input term)
            if lay.with_bottom_up[l]:
                cols = lay.below_block(l)
                dh_from_above = zb * da[:, cols]
                dz_from_above = dzb + rowdot(hidden[l - 1][:, t], da[:, cols])
            elif ln:
                raw = R[l][t]
                d_raw, d_gate, d_gamma, d_beta = _bottom_up_backward(ds, raw, w, zb, meta.eps)
                d_norms[l]["below_gamma"] += d_gamma
                d_norms[l]["below_beta"] += d_beta
                raw.copy_(d_raw)  # the product's gradient, for the weight gradient
                if l > 0:
                    dz_from_above = dzb + d_gate
                    if rows is not None:
                        rows = rows[zb.squeeze(-1).index_select(0, rows) != 0]
                    dh_from_above = _rows_linear(d_raw, w_below_t[l], rows, mm)
            dh_next[l] = dh_prev
            dz_next[l] = dzp
    # weight gradients: one product per weight over the window
    flat_grads = []
    for l, w in enumerate(layers):
        dS = S[l].view(T * B, -1)
        d = w.split_merged(_merged_weight_grad(meta, dS, A[l], live[l], lay, l, z_all, z0), lay.with_bottom_up[l])
        d["bias"] = dS.sum(0)
        if ln:
            below_in = (x_in if l == 0 else hidden[l - 1]).transpose(0, 1).reshape(T * B, -1)
            mask = live[l].flatten() & (z_all[:, :, l - 1].t().flatten() != 0) if meta.skip_rows and l > 0 else None
            d["bottom_up"] = _grad_product(R[l].view(T * B, -1), below_in, mask, mm)
            d.update(d_norms[l])
        for name in meta.names[l]:
            g = d.get(name)  # the first layer's W without LN: autograd's, through x_in
            flat_grads.append(None if g is None else g.to(getattr(w, name).dtype))
    if ln:  # the gradient of the input, through the first layer's input term
        dx = _matmul(R[0].view(T * B, -1), cast(layers[0].bottom_up), mm).view(T, B, -1).transpose(0, 1)
    else:  # the gradient of x_in = W x + b
        dx = S[0].transpose(0, 1)
    d_state = [g for l in range(L) for g in (dh_next[l], dc_next[l], dz_next[l].squeeze(-1))]
    return (dx, *flat_grads, *d_state)


def _grad_product(d: Tensor, x: Tensor, mask: Tensor | None, mm_dtype) -> Tensor:
    """``d^T x`` over the rows (steps x batch) where ``mask`` is true (None: all rows); the
    others are zero in ``d`` or in ``x``."""
    if mask is not None:
        rows = mask.nonzero().squeeze(-1)
        if rows.numel() < mask.numel():
            d, x = d.index_select(0, rows), x.index_select(0, rows)
    return _matmul(d.t(), x, mm_dtype)


def _merged_weight_grad(meta: _Meta, dS: Tensor, A: Tensor, live: Tensor, lay: InputLayout, l: int, z_all, z0) -> Tensor:
    """``dW_merged = sum_t ds_t^T a_t``, one product over the window; on CPU without the rows
    whose ``ds`` is 0, and per gated block without its closed rows."""
    T, B, _ = A.shape
    a_all = A.view(T * B, -1)
    if not meta.skip_rows:
        return _grad_product(dS, a_all, None, meta.mm_dtype)
    H, live = lay.above_start[l], live.flatten()  # the columns of h^l_{t-1}
    parts = [_grad_product(dS, a_all[:, :H], live, meta.mm_dtype)]
    if l + 1 < len(lay.width):  # gated by z^l_{t-1}
        gate = torch.cat([z0[l].unsqueeze(0), z_all[:, : T - 1, l].t()]).flatten()
        parts.append(_grad_product(dS, a_all[:, lay.above_block(l)], live & (gate != 0), meta.mm_dtype))
    if lay.with_bottom_up[l]:  # gated by z^{l-1}_t
        gate = z_all[:, :, l - 1].t().flatten()
        parts.append(_grad_product(dS, a_all[:, lay.below_block(l)], live & (gate != 0), meta.mm_dtype))
    return torch.cat(parts, dim=1)
