"""Fast path for HM-LSTM stacks: one autograd function for the whole sequence.

The reference loop (:class:`~hmrnn_lightning.cells.stack.HMStack`) lets autograd record
every small operation of every step. That is readable but slow: the backward pass then
computes each weight gradient as ``T`` thin products (``[hidden x batch] @ [batch x 4H]``)
and walks tens of graph nodes per layer and step. This module computes the same numbers
with the backward written out by hand:

* forward, without layer norm: per layer and step, the pre-activation ``a_t @ W^T`` where
  ``a_t = [h^l_{t-1}, z^l_{t-1} h^{l+1}_{t-1}, z^{l-1}_t h^{l-1}_t]`` and ``W`` is
  ``[U_l; U_{l+1}; W_{l-1}]`` side by side (gating the input rows equals gating the terms,
  because they are linear); the first layer's ``W x_t`` is one product over all steps
  before the loop. On CPU the gated blocks are multiplied only for the rows whose gate is
  open (:data:`SKIP_GATED_ROWS`). Kept for the backward pass: ``a_t``, ``c`` and the four
  gate activations.
* forward, with layer norm: the bottom-up term is normalised on its own before its gate
  multiplies it (:class:`~hmrnn_lightning.cells.base.HMCell` says why only that one; the
  code asks :meth:`LayerWeights.term_norm` which terms are normalised), so the three products
  stay apart (the
  first layer's input product is still one over all steps, but inside the function, so the
  backward pass returns the gradient of the ``[B, T, E]`` input rather than keeping one of
  ``[B, T, 4H + 1]``). Kept: each term's product before normalisation, and ``c``. The
  backward pass normalises the products again, which it must do anyway for the layer norm's
  own backward, and gets the gates from their sum; keeping the gates too put the Text8 shape
  (3 x 1024, batch 128) over twice nn.LSTM's memory. In training every row of a gated term is
  computed, closed or not: the straight-through gradient of its gate is ``<LN(W h), ds>``
  and needs it (``<W h, ds>`` for a term that is not normalised).
* backward: walks time backwards; per layer and step the products ``ds_t @ W`` give the
  gradients of the inputs. A closed gate's rows stay in them (the straight-through gradient
  of the boundary asks what the term it kept out would have changed), but rows in COPY
  have ``ds = 0`` and, on CPU, are left out. The weight gradients are products over many
  steps at once, ``dS^T @ A``, again without the rows that are zero: over the whole window
  without layer norm, over chunks of steps with it (:data:`LN_CHUNK_ROWS`), which keeps the
  per-term buffers small.

The forward pass cannot skip COPY rows in training: the straight-through gradient of the
COPY decision needs the ``h`` and ``c`` that an UPDATE would have produced. Generation,
which needs no gradient, does skip them (:mod:`hmrnn_lightning.cells.generation`).

The boundary estimator is called exactly as in the reference (same order, so the same
random draws); its own small graph from logit to ``z`` is kept and differentiated per step,
so every estimator's gradient rule (straight-through, soft, none for REINFORCE) carries
over unchanged. Estimators with trainable parameters would lose their gradients this way,
so :func:`supports` sends them to the other paths.

The derivatives, with ``u = (1 - z_prev) z_below`` (UPDATE), ``k = (1 - z_prev)(1 - z_below)``
(COPY) and ``z_prev`` (FLUSH) as in :mod:`hmrnn_lightning.cells.operations`::

    c = (u f + k) c_prev + (u + z_prev) i g        h = k h_prev + (1 - k) o tanh(N(c))
    z = k z_prev + (1 - k) e,  e = estimator(s[4H])

(``N`` is the cell's layer norm, or the identity) are the chain rule of these three lines,
of the gates ``f, i, o = sigm``, ``g = tanh``, and of layer norm (PyTorch's own kernels,
``native_layer_norm`` and its backward); ``tests/cells/test_fast_paths.py`` checks them
against autograd on the reference loop.

Mixed precision: under autocast the matrix products run in the autocast dtype (bf16 on
CPU or GPU, fp16 on GPU) and everything else (states, gates, layer norm, boundary
decisions) in fp32.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from hmrnn_lightning.cells.base import LayerState, at_least_fp32
from hmrnn_lightning.cells.hm_lstm_kernel import (
    TOP_LAYER_Z, LayerWeights, carry_boundary, flatten_layers, gate_activations, layer_norm_rows,
    layer_norm_rows_backward, layout_problem, matmul_dtype, pointwise_backward, pointwise_forward, rowdot,
    unflatten_layers,
)
from hmrnn_lightning.cells.operations import select_operations


#: Skip rows whose contribution is zero: in the forward pass the rows of the top-down and
#: bottom-up products whose gate ``z`` is 0 (without layer norm, or without gradients), in
#: the backward pass also the rows in COPY. None: on CPU only, where the forward skip
#: measured 10% and the two together 16% per stack step (PTB shape, 2 cores). Finding the
#: rows reads ``z`` on the host, which on a GPU would stall the stream once per layer and
#: step, so it stays off there.
SKIP_GATED_ROWS: bool | None = None

#: With layer norm, the weight gradients are one product per term over this many rows
#: (steps x batch) at a time: big enough to run at full speed, small enough that the
#: per-term buffers stay small.
LN_CHUNK_ROWS = 1024


def supports(stack) -> bool:
    """HM-LSTM cells whose parameters :class:`LayerWeights` holds (:func:`layout_problem`) and
    an estimator without trainable parameters."""
    if any(p.requires_grad for p in stack.estimator.parameters()):
        return False
    return all(layout_problem(cell) is None for cell in stack.cells)


def term_names(layer: int, layers: int) -> list[str]:
    """With layer norm, the pre-activation terms of layer ``layer``: ``rec`` (``U_l h^l_{t-1}``),
    ``above`` (``U_{l+1} h^{l+1}_{t-1}``, gated by ``z^l_{t-1}``) and ``below``
    (``W_{l-1} h^{l-1}_t``, gated by ``z^{l-1}_t``; for the first layer ``W x_t``, never gated,
    its product one over all steps)."""
    return ["rec"] + (["above"] if layer + 1 < layers else []) + ["below"]


def layer_params(stack) -> list[LayerWeights]:
    """Per layer, the parameters the sequence function takes, by role."""
    return [LayerWeights.from_cell(cell) for cell in stack.cells]


def term_weights(w: LayerWeights, layer: int, layers: int) -> dict[str, Tensor]:
    """The weights a layer multiplies by: ``{"merged": [U_l; U_{l+1}; W_{l-1}]}`` without layer
    norm (:meth:`LayerWeights.merged`), ``{term: W_term}`` per :func:`term_names` with it."""
    if not w.layer_norm:
        return {"merged": w.merged(with_bottom_up=layer > 0)}
    return {name: w.term_weight(name) for name in term_names(layer, layers)}


def sequence_forward(stack, x: Tensor, state: list[LayerState], boundaries: Tensor | None):
    """The body of :meth:`HMStack.forward` on this path.

    Returns ``(hidden, boundaries, logits, state)``: ``hidden`` per layer ``[B, T, H_l]``,
    ``boundaries`` ``[B, T, L]``, ``logits`` ``[B, T, L - 1]``, the final state.
    """
    mm_dtype = matmul_dtype(x)
    dtype = stack.state_dtype(x)
    first = stack.cells[0]
    if first.layer_norm:
        # the first layer's input term goes in whole: its gradient is then the input's, [B, T, E],
        # not a [B, T, 4H + 1] tensor kept to the end of the backward pass
        x_in = x.to(dtype)
    else:
        x_in = at_least_fp32(first.bottom_up(x)).to(dtype)  # hoisted here, differentiated by autograd
    params = layer_params(stack)
    names, flat_params = flatten_layers(params)
    flat_state = [t for s in state for t in (s.h, s.c, s.z)]
    L = len(stack.cells)
    skip = SKIP_GATED_ROWS if SKIP_GATED_ROWS is not None else x.device.type == "cpu"
    eps = first.norm_cell.eps if first.layer_norm else 0.0
    meta = _Meta(stack.estimator, boundaries, mm_dtype, L, skip, names, eps)
    tensors = [x_in, *flat_params, *flat_state]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        outs = _HMLSTMSequence.apply(meta, *tensors)
    else:
        with torch.no_grad():
            outs = _forward(meta, x_in, params, flat_state, keep=None)
    hidden = list(outs[:L])
    z_all, logits = outs[L], outs[L + 1]
    final = [LayerState(*outs[L + 2 + 3 * l : L + 5 + 3 * l]) for l in range(L)]
    return hidden, z_all, logits, final


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


class _Kept:
    """What the backward pass needs beyond the function's inputs and outputs. Time-major
    (``[T, B, ...]``) so that each step's slice is one contiguous block."""

    def __init__(self) -> None:
        self.inputs: list[Tensor] = []  # without LN, per layer, a_t for every step [T, B, K_l]
        self.gates: list[Tensor] = []  # without LN, per layer [T, B, 4H]: f, i, o after sigm, g after tanh
        self.cells: list[Tensor] = []  # per layer [T, B, H]
        # with LN, per layer and term, the product before normalisation [T, B, 4H + 1]; its
        # mean and 1/std, the cell's, and the gates are recomputed in the backward pass
        self.raw: list[dict[str, Tensor]] = []
        self.estimates: Tensor | None = None  # e = estimator(logit) before COPY keeps z, [B, T, L - 1]
        self.graphs: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}  # (t, l) -> (logit leaf, e)


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
    if mm_dtype is None or mm_dtype == a.dtype:
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


def term_norm(raw: Tensor, p: LayerWeights, name: str, eps: float) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(term, mean, 1/std)`` of a product: layer-normalised where the layer normalises that
    term (:meth:`LayerWeights.term_norm`), else the product itself with no statistics."""
    norm = p.term_norm(name)
    if norm is None:
        return raw, None, None
    return layer_norm_rows(raw, *norm, eps)


def term_norm_backward(dy: Tensor, raw: Tensor, mean, rstd, p: LayerWeights, name: str):
    """``(d raw, d gamma, d beta)`` of :func:`term_norm` (no parameter gradients for a plain term)."""
    norm = p.term_norm(name)
    if norm is None:
        return dy, None, None
    return layer_norm_rows_backward(dy, raw, mean, rstd, *norm)


def ln_term(
    p: dict[str, Tensor], name: str, x: Tensor, w: Tensor, eps: float, mm_dtype, out: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One term, ``LN_name(x @ W_name^T)`` (or the product itself where the term is not
    normalised); returns ``(term, product, mean, 1/std)``.

    Layer norm reads rows, so the product (computed by :func:`_linear` as a transpose) is
    copied once into row-major memory, ``out`` if given. Measured per ``[64, 512] x [512, 2049]``
    term on 2 cores: 2.6 ms this way, 3.1 ms for a row-major product ``x @ W^T``."""
    raw = _linear(x, w, mm_dtype)
    raw = raw.contiguous() if out is None else out.copy_(raw)
    term, mean, rstd = term_norm(raw, p, name, eps)
    return term, raw, mean, rstd


def ln_preactivation(
    p: dict[str, Tensor], w: dict[str, Tensor], inputs: dict[str, Tensor | None], layer: int, zp: Tensor,
    zb: Tensor | None, eps: float, mm_dtype, skip_closed: bool, out: dict[str, Tensor] | None = None,
    given: dict[str, Tensor] | None = None,
) -> Tensor:
    """``s = b + U_l h^l_{t-1} + z^l_{t-1} U_{l+1} h^{l+1}_{t-1} + z^{l-1}_t LN_below(W_{l-1} h^{l-1}_t)``
    (each term through :func:`term_norm`)
    with ``inputs`` ``{"rec": h^l_{t-1}, "above": h^{l+1}_{t-1}, "below": h^{l-1}_t}`` (None
    where the layer has no such term), ``p`` the layer's :func:`layer_params` and ``w`` its
    :func:`term_weights`. Shared by the sequence path and the generation step.

    Args:
        given: products already computed (the first layer's input term, one product over
            all steps).
        out: where to write each product, for the backward pass.
        skip_closed: compute the gated terms only for their open rows (never with ``out``:
            the backward pass needs every row).
    """
    s = p.bias.expand(next(x for x in inputs.values() if x is not None).shape[0], -1).clone()
    for name, x in inputs.items():
        if x is None and (given is None or name not in given):
            continue
        gate = _term_gate(name, layer, zp, zb)
        rows = None
        if given is not None and name in given:
            term = term_norm(given[name], p, name, eps)[0]
        else:
            if gate is not None and skip_closed:
                rows = _open_rows(gate)
                if rows.numel() == 0:
                    continue
                if rows.numel() == x.shape[0]:
                    rows = None
            dest = out[name] if out is not None else None
            term = ln_term(p, name, x if rows is None else x.index_select(0, rows), w[name], eps, mm_dtype, dest)[0]
        if gate is None:
            s += term
        elif rows is None:
            s.addcmul_(term, gate)
        else:
            s.index_add_(0, rows, term.mul_(gate.index_select(0, rows)))
    return s


def _forward(meta: _Meta, x_in: Tensor, params: list[dict[str, Tensor]], flat_state, keep: _Kept | None):
    """The time loop over ``x_in``, the first layer's input product ``[B, T, 4H + 1]`` without
    layer norm, the input itself ``[B, T, E]`` with it. With ``keep``, stores what the
    backward pass needs and the estimator's graphs; without, it is plain inference."""
    L = meta.layers
    B, T, _ = x_in.shape
    dtype = x_in.dtype
    ln = meta.layer_norm
    sizes = [p.hidden_size for p in params]
    h = [flat_state[3 * l] for l in range(L)]
    c = [flat_state[3 * l + 1] for l in range(L)]
    z = [flat_state[3 * l + 2] for l in range(L)]
    cast = (lambda w: w.to(meta.mm_dtype)) if meta.mm_dtype else (lambda w: w)
    w_mm = [{k: cast(v) for k, v in term_weights(p, l, L).items()} for l, p in enumerate(params)]
    new = x_in.new_empty
    hidden = [new(B, T, H) for H in sizes]
    z_all = x_in.new_zeros(B, T, L)
    logits = new(B, T, L - 1)
    steps = T if keep is not None else 1
    # without LN the gates are kept for the backward pass; with LN it recomputes them from the
    # terms, which it normalises again anyway (this saved 4H floats per row, layer and step)
    gates = [new(steps if not ln else 1, B, 4 * H) for H in sizes]
    if ln:
        # the first layer's input term: one product over all steps, time-major
        x_raw = _matmul(x_in.transpose(0, 1).reshape(T * B, -1), w_mm[0]["below"].t(), meta.mm_dtype).view(T, B, -1)
    else:
        inputs = [new(steps, B, w["merged"].shape[1]) for w in w_mm]
        xb = (x_in + params[0].bias).transpose(0, 1).contiguous()  # [T, B, 4H + 1]
    if keep is not None:
        keep.cells = [new(T, B, H) for H in sizes]
        keep.estimates = new(B, T, L - 1)
        if ln:
            keep.raw = [{n: new(T, B, 4 * H + 1) for n in term_names(l, L) if (l, n) != (0, "below")} for l, H in enumerate(sizes)]
            keep.raw[0]["below"] = x_raw
        else:
            keep.inputs, keep.gates = inputs, gates
    ones = torch.ones(B, 1, dtype=dtype, device=x_in.device)
    zeros = torch.full((B,), TOP_LAYER_Z, dtype=dtype, device=x_in.device)
    for t in range(T):
        slot = t if keep is not None else 0
        zb = ones
        for l in range(L):
            H = sizes[l]
            zp = z[l].unsqueeze(-1)
            act = gates[l][slot if not ln else 0]
            if ln:
                inputs = {"rec": h[l], "above": h[l + 1] if l + 1 < L else None, "below": h[l - 1] if l > 0 else None}
                s = ln_preactivation(
                    params[l], w_mm[l], inputs, l, zp, zb, meta.eps, meta.mm_dtype,
                    skip_closed=keep is None and meta.skip_rows,
                    out={n: buf[t] for n, buf in keep.raw[l].items()} if keep is not None else None,
                    given={"below": x_raw[t]} if l == 0 else None,
                )
            else:
                bias = xb[t] if l == 0 else params[l].bias
                s = _merged_preactivation(meta, w_mm[l]["merged"], bias, inputs[l][slot], h, l, zp, zb, sizes)
            ops = select_operations(zb.squeeze(-1), z[l])
            u, k = ops.update, ops.copy
            c_new = keep.cells[l][t] if keep is not None else torch.empty_like(c[l])
            cell_norm = (params[l].cell_gamma, params[l].cell_beta, meta.eps) if ln else None
            pointwise_forward(s, c[l], h[l], u, k, zp, act, c_new, hidden[l][:, t], cell_norm)
            if l + 1 < L:
                logit = s[:, 4 * H]
                logits[:, t, l] = logit
                if meta.boundaries is not None:
                    e = meta.boundaries[:, t, l].to(dtype)
                elif keep is not None:
                    with torch.enable_grad():
                        leaf = logit.detach().requires_grad_()
                        e_graph = meta.estimator(leaf)
                    e = e_graph.detach().to(dtype)
                    if e_graph.requires_grad:
                        keep.graphs[(t, l)] = (leaf, e_graph)
                else:
                    e = meta.estimator(logit).to(dtype)
                if keep is not None:
                    keep.estimates[:, t, l] = e
                k1 = k.squeeze(-1)
                z_new = carry_boundary(k1, z[l], e)
            else:
                z_new = zeros
            z_all[:, t, l] = z_new
            h[l], c[l], z[l] = hidden[l][:, t], c_new, z_new
            zb = z_new.unsqueeze(-1)
    final = [t for l in range(L) for t in (h[l].clone(), c[l].clone(), z[l].clone())]
    return (*hidden, z_all, logits, *final)


def _merged_preactivation(meta: _Meta, w: Tensor, bias: Tensor, a: Tensor, h: list[Tensor], l: int, zp: Tensor, zb: Tensor, sizes) -> Tensor:
    """Without layer norm: ``s = b + a_t @ W^T``, writing ``a_t`` into ``a``; on CPU each gated
    block is multiplied for its open rows only."""
    H = sizes[l]
    a[:, :H] = h[l]
    blocks = _gated_columns(l, sizes)
    for name, cols in blocks.items():
        torch.mul(h[l + 1] if name == "above" else h[l - 1], _term_gate(name, l, zp, zb), out=a[:, cols])
    if not meta.skip_rows:
        return affine(bias, a, w, meta.mm_dtype)
    s = affine(bias, a[:, :H], w[:, :H], meta.mm_dtype)
    for name, cols in blocks.items():
        gated_addmm_(s, _term_gate(name, l, zp, zb), a[:, cols], w[:, cols], meta.mm_dtype)
    return s


class _HMLSTMSequence(torch.autograd.Function):
    """Inputs: meta, x_in (see :func:`_forward`), each layer's :class:`LayerWeights` flattened,
    (h, c, z) per layer. Outputs: L hidden sequences, boundaries, logits, (h, c, z) per
    layer."""

    @staticmethod
    def forward(ctx, meta: _Meta, x_in: Tensor, *rest: Tensor):  # type: ignore[override]
        L = meta.layers
        n = sum(len(names) for names in meta.names)
        flat_params, flat_state = list(rest[:n]), list(rest[n:])
        keep = _Kept()
        with torch.autocast(x_in.device.type, enabled=False):
            outs = _forward(meta, x_in, meta.unflatten(flat_params), flat_state, keep)
        ctx.meta, ctx.keep, ctx.num_params = meta, keep, n
        # only the LayerNorm path reads x_in again (its input term's weight gradient); without
        # LN it is x_proj, [B, T, 4H + 1]: keeping it raised the Text8 shape's peak from 4,025 to 4,305 MB
        ctx.save_for_backward(x_in if meta.layer_norm else None, *flat_params, *flat_state, *outs[:L], outs[L])
        return outs

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: Tensor):  # type: ignore[override]
        meta, keep, n = ctx.meta, ctx.keep, ctx.num_params
        L = meta.layers
        x_in, *saved = ctx.saved_tensors
        params = meta.unflatten(saved[:n])
        flat_state = saved[n : n + 3 * L]
        hidden = saved[n + 3 * L : n + 4 * L]
        z_all = saved[n + 4 * L]
        with torch.autocast(z_all.device.type, enabled=False):
            out = _backward(meta, keep, x_in, params, flat_state, hidden, z_all, grads)
        ctx.keep = None  # free the stored activations now, not when the graph goes
        return (None, *out)


def _zero_if_none(g: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if g is None else g


def _rows_linear(d: Tensor, w_t: Tensor, rows: Tensor | None, mm_dtype) -> Tensor:
    """``d @ w_t^T`` where only ``rows`` of ``d`` can be non-zero (None: all rows)."""
    if rows is None or rows.numel() == d.shape[0]:
        return _linear(d, w_t, mm_dtype)
    out = d.new_zeros(d.shape[0], w_t.shape[0])
    if rows.numel() > 0:
        out.index_copy_(0, rows, _linear(d.index_select(0, rows), w_t, mm_dtype))
    return out


def _gated_columns(l: int, sizes: list[int]) -> dict[str, slice]:
    """Where the gated blocks ``above`` and ``below`` sit in ``a_t`` (after ``h^l_{t-1}``)."""
    out, col = {}, sizes[l]
    if l + 1 < len(sizes):
        out["above"] = slice(col, col + sizes[l + 1])
        col += sizes[l + 1]
    if l > 0:
        out["below"] = slice(col, col + sizes[l - 1])
    return out


def _steps(seq: Tensor, first: Tensor, t0: int, t1: int, before: bool) -> Tensor:
    """``seq`` ``[B, T, ...]`` at steps ``t0 .. t1 - 1`` (or the steps before them, ``first``
    before step 0), time-major and flattened to ``[(t1 - t0) B, ...]``."""
    if not before:
        part = seq[:, t0:t1].transpose(0, 1)
    elif t0 > 0:
        part = seq[:, t0 - 1 : t1 - 1].transpose(0, 1)
    else:
        part = torch.cat([first.unsqueeze(0), seq[:, : t1 - 1].transpose(0, 1)])
    return part.reshape(-1, *seq.shape[2:])


def _gate_steps(name: str, l: int, z_all: Tensor, z0: list[Tensor], t0: int, t1: int) -> Tensor:
    """The gate of layer ``l``'s term ``name`` at steps ``t0 .. t1 - 1``, laid out as
    :func:`_steps` lays out the rows: ``z^l_{t-1}`` for ``above``, ``z^{l-1}_t`` for ``below``."""
    if name == "above":
        return _steps(z_all[:, :, l], z0[l], t0, t1, before=True)
    return _steps(z_all[:, :, l - 1], None, t0, t1, before=False)


def _backward(meta: _Meta, keep: _Kept, x_in: Tensor | None, params, flat_state, hidden, z_all, grads):
    L = meta.layers
    B, T, _ = z_all.shape
    ln = meta.layer_norm
    sizes = [p.hidden_size for p in params]
    mm_dtype = meta.mm_dtype
    cast = (lambda w: w.to(mm_dtype)) if mm_dtype else (lambda w: w)
    # weights for ds @ W, [in, out]; per layer "merged" or per term
    w_t = [{k: cast(v).t().contiguous() for k, v in term_weights(p, l, L).items()} for l, p in enumerate(params)]
    # gradients by LayerWeights field; with LN they add up step by step and chunk by chunk,
    # without it they come at the end
    d_params = [{k: torch.zeros_like(getattr(p, k)) for k in names} if ln else {} for p, names in zip(params, meta.names)]
    g_hidden = [_zero_if_none(grads[l], hidden[l]) for l in range(L)]
    g_z = _zero_if_none(grads[L], z_all)
    g_logits = grads[L + 1]
    g_final = grads[L + 2 :]
    h0 = [flat_state[3 * l] for l in range(L)]
    c0 = [flat_state[3 * l + 1] for l in range(L)]
    z0 = [flat_state[3 * l + 2] for l in range(L)]
    # gradients arriving at (h, c, z) of each layer from the step after (or the final state)
    dh_next = [_zero_if_none(g_final[3 * l], h0[l]) for l in range(L)]
    dc_next = [_zero_if_none(g_final[3 * l + 1], c0[l]) for l in range(L)]
    dz_next = [_zero_if_none(g_final[3 * l + 2], z0[l]).unsqueeze(-1) for l in range(L)]
    dz_next[L - 1] = torch.zeros_like(dz_next[L - 1])  # the top layer's z is the constant 0
    # ds of every step without LN, for the weight gradients at the end (the first layer's is
    # also the gradient of x_in); with LN only the current step's
    span = T if not ln else 1
    d_pre = [hidden[l].new_empty(span, B, 4 * sizes[l] + 1) for l in range(L)]
    act_ln = [hidden[l].new_empty(B, 4 * sizes[l]) for l in range(L)] if ln else None  # gates, recomputed
    dx = x_in.new_empty(T, B, x_in.shape[-1]) if ln else None  # the gradient of x_in, time-major (LN)
    chunk = max(1, min(T, LN_CHUNK_ROWS // B)) if ln else T
    live_rows = [torch.ones(chunk, B, dtype=torch.bool, device=z_all.device) for _ in range(L)]  # ds row not 0
    d_raw = [{n: hidden[l].new_empty(chunk, B, 4 * sizes[l] + 1) for n in term_names(l, L)} for l in range(L)] if ln else None
    ones = z_all.new_ones(B)  # z^0_t: the input always "ends a segment"
    for t in range(T - 1, -1, -1):
        slot = t % chunk
        dh_from_above = dz_from_above = None  # d h^l_t, d z^l_t through layer l+1's bottom-up term
        for l in range(L - 1, -1, -1):
            H = sizes[l]
            top = l + 1 == L
            h_prev = hidden[l][:, t - 1] if t > 0 else h0[l]
            c_prev = keep.cells[l][t - 1] if t > 0 else c0[l]
            ops = select_operations(z_all[:, t, l - 1] if l > 0 else ones, z_all[:, t - 1, l] if t > 0 else z0[l])
            u, k, zp = ops.update, ops.copy, ops.flush
            zb = z_all[:, t, l - 1 : l] if l > 0 else None
            dh = g_hidden[l][:, t] + dh_next[l]
            if dh_from_above is not None:
                dh = dh + dh_from_above
            ds = d_pre[l][t if span == T else 0]
            cell_norm = (params[l].cell_gamma, params[l].cell_beta, meta.eps) if ln else None
            if ln:
                terms = _ln_terms(meta, keep, params[l], l, t, zp, zb, act_ln[l])
                act = act_ln[l]
            else:
                act = keep.gates[l][t]
            dc_next[l], dh_prev, du, dk, dzp, d_norm = pointwise_backward(
                act, keep.cells[l][t], c_prev, h_prev, u, k, zp, dh, dc_next[l], ds, cell_norm
            )
            if d_norm is not None:
                d_params[l]["cell_gamma"] += d_norm[0]
                d_params[l]["cell_beta"] += d_norm[1]
            d_logit = None
            if not top:
                dz = g_z[:, t, l : l + 1] + dz_next[l]
                if dz_from_above is not None:
                    dz = dz + dz_from_above
                e = keep.estimates[:, t, l : l + 1]
                dzp = dzp + k * dz
                dk = dk + (zp - e) * dz
                graph = keep.graphs.get((t, l))
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
            live = None
            if meta.skip_rows and l > 0:
                live_mask = (k.squeeze(-1) != 1) | (ds[:, 4 * H] != 0)
                live_rows[l][slot] = live_mask
                live = live_mask.nonzero().squeeze(-1)
            if ln:
                d_params[l]["bias"] += ds.sum(0)
                d_in, d_gates = _ln_input_grads(meta, keep, params[l], w_t[l], d_params[l], d_raw[l], terms, l, t, slot, ds, zp, zb, live)
            else:
                da = _rows_linear(ds, w_t[l]["merged"], live, mm_dtype)
                d_in, d_gates = {"rec": da[:, :H]}, {}
                for name, cols in _gated_columns(l, sizes).items():
                    x = (hidden[l + 1][:, t - 1] if t > 0 else h0[l + 1]) if name == "above" else hidden[l - 1][:, t]
                    d_in[name], d_gates[name] = _term_gate(name, l, zp, zb) * da[:, cols], rowdot(x, da[:, cols])
            dh_prev = dh_prev + d_in["rec"]
            if not top:
                dh_next[l + 1] = dh_next[l + 1] + d_in["above"]  # layer l+1 at step t is done
                dzp = dzp + d_gates["above"]
            if l > 0:
                dh_from_above = d_in["below"]
                dz_from_above = dzb + d_gates["below"]
            dh_next[l] = dh_prev
            dz_next[l] = dzp
            if ln and slot == 0:  # the first step of a chunk: its weight gradients
                _ln_weight_grads(meta, d_params[l], d_raw[l], live_rows[l], hidden, h0, z_all, z0, x_in, dx, w_t[l], l, t, min(t + chunk, T))
    if not ln:
        for l in range(L):
            merged = _merged_weight_grad(meta, d_pre[l], keep.inputs[l], live_rows[l], z_all, z0, l, sizes)
            d_params[l] = params[l].split_merged(merged, with_bottom_up=l > 0)  # the first layer's W: autograd's
            d_params[l]["bias"] = d_pre[l].flatten(0, 1).sum(0)
    flat_grads = [
        None if k not in d_params[l] else d_params[l][k].to(getattr(params[l], k).dtype)
        for l in range(L) for k in meta.names[l]
    ]
    d_state = [t for l in range(L) for t in (dh_next[l], dc_next[l], dz_next[l].squeeze(-1))]
    return ((dx if ln else d_pre[0]).transpose(0, 1), *flat_grads, *d_state)


def _merged_weight_grad(meta: _Meta, d_pre: Tensor, inputs: Tensor, live: Tensor, z_all, z0, l: int, sizes) -> Tensor:
    """Without layer norm: ``dW = sum_t ds_t^T a_t``, one product over all steps (on CPU
    without the rows whose ``ds`` is 0, and per gated block without its closed rows)."""
    ds_all, a_all = d_pre.flatten(0, 1), inputs.flatten(0, 1)
    if not meta.skip_rows:
        return _matmul(ds_all.t(), a_all, meta.mm_dtype)
    H, live = sizes[l], live.flatten()
    rows = live.nonzero().squeeze(-1)
    if rows.numel() == live.numel():
        parts = [_matmul(ds_all.t(), a_all[:, :H], meta.mm_dtype)]
    else:
        parts = [_matmul(ds_all.index_select(0, rows).t(), a_all[:, :H].index_select(0, rows), meta.mm_dtype)]
    for name, cols in _gated_columns(l, sizes).items():
        rows = ((_gate_steps(name, l, z_all, z0, 0, d_pre.shape[0]) != 0) & live).nonzero().squeeze(-1)
        parts.append(_matmul(ds_all.index_select(0, rows).t(), a_all[:, cols].index_select(0, rows), meta.mm_dtype))
    return torch.cat(parts, dim=1)


def _term_gate(name: str, l: int, zp: Tensor, zb: Tensor | None) -> Tensor | None:
    """The gate multiplying a term (None: not gated; the first layer's input term is not)."""
    return {"rec": None, "above": zp, "below": zb if l > 0 else None}[name]


def _ln_terms(meta: _Meta, keep: _Kept, p, l: int, t: int, zp, zb, act: Tensor) -> dict[str, tuple[Tensor, Tensor, Tensor]]:
    """With layer norm, the terms of step ``t`` normalised again from the kept products, as
    ``{term: (LN(product), mean, 1/std)}``; the gates, from their sum, into ``act``."""
    terms = {}
    s = p.bias.expand(act.shape[0], -1).clone()
    for name in term_names(l, meta.layers):
        terms[name] = term_norm(keep.raw[l][name][t], p, name, meta.eps)
        gate = _term_gate(name, l, zp, zb)
        if gate is None:
            s += terms[name][0]
        else:
            s.addcmul_(terms[name][0], gate)
    gate_activations(s, act)
    return terms


def _ln_input_grads(meta: _Meta, keep: _Kept, p, w_t, d_p, d_raw, terms, l: int, t: int, slot: int, ds, zp, zb, live):
    """With layer norm, per term: the layer norm's backward (its ``dgamma``, ``dbeta`` added
    to ``d_p``; the product's gradient stored in ``d_raw`` for the weight gradient), the
    gradient of the term's input (the first layer's input term waits for its chunk), and for
    gated terms the gradient of the gate, ``<LN(W x), ds>``. Returns
    ``({term: d input}, {term: d gate})``."""
    d_in, d_gates = {}, {}
    for name in term_names(l, meta.layers):
        gate = _term_gate(name, l, zp, zb)
        term, mean, rstd = terms[name]
        raw = keep.raw[l][name][t]
        d_raw_t, d_gamma, d_beta = term_norm_backward(ds if gate is None else ds * gate, raw, mean, rstd, p, name)
        if d_gamma is not None:
            d_p[f"{name}_gamma"] += d_gamma  # LayerWeights' below_gamma / below_beta
            d_p[f"{name}_beta"] += d_beta
        d_raw[name][slot] = d_raw_t
        if l == 0 and name == "below":
            continue
        rows = live
        if gate is not None:
            d_gates[name] = rowdot(term, ds)
            if rows is not None:
                rows = rows[gate.squeeze(-1).index_select(0, rows) != 0]
        d_in[name] = _rows_linear(d_raw_t, w_t[name], rows, meta.mm_dtype)
    return d_in, d_gates


def _ln_weight_grads(meta: _Meta, d_p, d_raw, live, hidden, h0, z_all, z0, x_in, dx, w_t, l: int, t0: int, t1: int) -> None:
    """With layer norm: ``dW_term += sum_t d raw_t^T x_t`` over steps ``t0 .. t1 - 1``, one
    product per term (on CPU without the rows whose gradient is 0); for the first layer also
    the gradient of its input over these steps, into ``dx``."""
    n = t1 - t0
    inputs = {
        "rec": lambda: _steps(hidden[l], h0[l], t0, t1, before=True),
        "above": lambda: _steps(hidden[l + 1], h0[l + 1], t0, t1, before=True),
        "below": lambda: _steps(hidden[l - 1] if l > 0 else x_in, None, t0, t1, before=False),
    }
    for name in term_names(l, meta.layers):
        d = d_raw[name][:n].flatten(0, 1)
        x = inputs[name]()
        if l == 0 and name == "below":
            dx[t0:t1] = _linear(d, w_t[name], meta.mm_dtype).view(n, -1, dx.shape[-1])
        elif meta.skip_rows:
            mask = live[:n].flatten()
            if name != "rec":
                mask = mask & (_gate_steps(name, l, z_all, z0, t0, t1) != 0)
            rows = mask.nonzero().squeeze(-1)
            if rows.numel() < mask.numel():
                d, x = d.index_select(0, rows), x.index_select(0, rows)
        d_p[LayerWeights.TERMS[name]] += _matmul(d.t(), x, meta.mm_dtype)
