"""Fast path for HM-LSTM stacks: one autograd function for the whole sequence.

The reference loop (:class:`~hmrnn_lightning.cells.stack.HMStack`) lets autograd record
every small operation of every step. That is readable but slow: the backward pass then
computes each weight gradient as ``T`` thin products (``[hidden x batch] @ [batch x 4H]``)
and walks tens of graph nodes per layer and step. This module computes the same numbers
with the backward written out by hand:

* forward: per layer and step, the pre-activation ``a_t @ W^T`` where
  ``a_t = [h^l_{t-1}, z^l_{t-1} h^{l+1}_{t-1}, z^{l-1}_t h^{l-1}_t]`` and ``W`` is
  ``[U_l; U_{l+1}; W_{l-1}]`` side by side (gating the input rows equals gating the terms,
  because they are linear); the first layer's ``W x_t`` is one product over all steps
  before the loop. On CPU the gated blocks are multiplied only for the rows whose gate is
  open (:data:`SKIP_GATED_ROWS`). Kept for the backward pass: ``a_t``, ``c`` and the four
  gate activations.
* backward: walks time backwards; per layer and step one product ``ds_t @ W`` gives the
  gradients of the inputs. A closed gate's rows stay in it (the straight-through gradient
  of the boundary asks what the term it kept out would have changed), but rows in COPY
  have ``ds = 0`` and, on CPU, are left out. The weight gradients wait until the end and
  are one product over all steps, ``dS^T @ A``, again without the rows that are zero.

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

    c = (u f + k) c_prev + (u + z_prev) i g        h = k h_prev + (1 - k) o tanh(c)
    z = k z_prev + (1 - k) e,  e = estimator(s[4H])

are the chain rule of these three lines and of the gates ``f, i, o = sigm``, ``g = tanh``;
``tests/cells/test_fast_paths.py`` checks them against autograd on the reference loop.

Mixed precision: under autocast the matrix products run in the autocast dtype (bf16 on
CPU or GPU, fp16 on GPU) and everything else (states, gates, boundary decisions) in fp32.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from hmrnn_lightning.cells.base import LayerState, at_least_fp32
from hmrnn_lightning.cells.hm_lstm import HMLSTMCell
from hmrnn_lightning.cells.operations import select_operations


#: Skip rows whose contribution is zero: in the forward pass the rows of the top-down and
#: bottom-up products whose gate ``z`` is 0, in the backward pass also the rows in COPY.
#: None: on CPU only, where the forward skip measured 10% and the two together 16% per
#: stack step (PTB shape, 2 cores). Finding the rows reads ``z`` on the host, which on a
#: GPU would stall the stream once per layer and step, so it stays off there.
SKIP_GATED_ROWS: bool | None = None


def supports(stack) -> bool:
    """HM-LSTM cells without layer norm, and an estimator without trainable parameters."""
    return (
        all(type(cell) is HMLSTMCell and not cell.layer_norm for cell in stack.cells)
        and not any(p.requires_grad for p in stack.estimator.parameters())
    )


def _matmul_dtype(x: Tensor) -> torch.dtype | None:
    """The autocast dtype for matrix products when autocast is on for ``x``'s device."""
    kind = x.device.type
    if kind in ("cpu", "cuda") and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return None


def layer_weights(stack) -> list[Tensor]:
    """Per layer ``[U_l; U_{l+1}; W_{l-1}]`` side by side, ``[4H + 1, K_l]`` (the first layer's
    bottom-up weight is left out: its product is hoisted out of the loop)."""
    out = []
    for l, cell in enumerate(stack.cells):
        parts = [cell.recurrent.weight]
        if cell.top_down is not None:
            parts.append(cell.top_down.weight)
        if l > 0:
            parts.append(cell.bottom_up.weight)
        out.append(torch.cat(parts, dim=1))
    return out


def sequence_forward(stack, x: Tensor, state: list[LayerState], boundaries: Tensor | None):
    """The body of :meth:`HMStack.forward` on this path.

    Returns ``(hidden, boundaries, logits, state)``: ``hidden`` per layer ``[B, T, H_l]``,
    ``boundaries`` ``[B, T, L]``, ``logits`` ``[B, T, L - 1]``, the final state.
    """
    mm_dtype = _matmul_dtype(x)
    dtype = stack.state_dtype(x)
    first = stack.cells[0]
    x_proj = at_least_fp32(first.bottom_up(x)).to(dtype)
    weights = layer_weights(stack)
    biases = [cell.bias for cell in stack.cells]
    flat_state = [t for s in state for t in (s.h, s.c, s.z)]
    L = len(stack.cells)
    skip = SKIP_GATED_ROWS if SKIP_GATED_ROWS is not None else x.device.type == "cpu"
    meta = _Meta(stack.estimator, boundaries, mm_dtype, L, skip)
    tensors = [x_proj, *weights, *biases, *flat_state]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        outs = _HMLSTMSequence.apply(meta, *tensors)
    else:
        with torch.no_grad():
            outs = _forward(meta, x_proj, weights, biases, flat_state, keep=None)
    hidden = list(outs[:L])
    z_all, logits = outs[L], outs[L + 1]
    final = [LayerState(*outs[L + 2 + 3 * l : L + 5 + 3 * l]) for l in range(L)]
    return hidden, z_all, logits, final


class _Meta:
    """The non-tensor inputs of the autograd function."""

    def __init__(self, estimator, boundaries: Tensor | None, mm_dtype: torch.dtype | None, layers: int, skip_rows: bool) -> None:
        self.estimator = estimator
        self.boundaries = boundaries
        self.mm_dtype = mm_dtype
        self.layers = layers
        self.skip_rows = skip_rows


class _Kept:
    """What the backward pass needs beyond the function's inputs and outputs. Time-major
    (``[T, B, ...]``) so that each step's slice is one contiguous block."""

    def __init__(self) -> None:
        self.inputs: list[Tensor] = []  # per layer, a_t for every step [T, B, K_l]
        self.gates: list[Tensor] = []  # per layer [T, B, 4H]: f, i, o after sigm, g after tanh
        self.cells: list[Tensor] = []  # per layer [T, B, H]
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


def _affine(bias: Tensor, a: Tensor, w: Tensor, mm_dtype: torch.dtype | None) -> Tensor:
    """``bias + a @ w^T``; ``bias`` is ``[out]`` or ``[batch, out]``."""
    if mm_dtype is None or mm_dtype == a.dtype:
        return torch.addmm(bias.unsqueeze(-1) if bias.dim() == 1 else bias.t(), w, a.t()).t()
    return _linear(a, w, mm_dtype).add_(bias)


def _open_rows(gate: Tensor) -> Tensor:
    return gate.squeeze(-1).nonzero().squeeze(-1)


def _gated_addmm_(s: Tensor, gate: Tensor, gated_x: Tensor, w: Tensor, mm_dtype) -> None:
    """``s += gated_x @ w^T`` where ``gated_x = gate * x``: rows whose gate is 0 are zero and
    are skipped."""
    rows = _open_rows(gate)
    if rows.numel() == s.shape[0]:
        s += _linear(gated_x, w, mm_dtype)
    elif rows.numel() > 0:
        s.index_add_(0, rows, _linear(gated_x.index_select(0, rows), w, mm_dtype))


def _cell_forward(s: Tensor, c_prev: Tensor, h_prev: Tensor, u: Tensor, k: Tensor, zp: Tensor, act: Tensor, c_out: Tensor, h_out: Tensor) -> None:
    """Gates and eqs. 2-3 into ``act`` ``[B, 4H]``, ``c_out`` and ``h_out``.

    ``c = (u f + k) c_prev + (u + z_prev) i g`` is the reference's
    ``u (f c_prev + i g) + z_prev i g + k c_prev`` regrouped; with binary weights COPY
    (``k = 1``) still gives ``c_prev`` exactly, and ``lerp`` returns its end point exactly
    at weight 1, so ``h`` is copied bit for bit too."""
    H = c_prev.shape[-1]
    torch.sigmoid(s[:, : 3 * H], out=act[:, : 3 * H])
    torch.tanh(s[:, 3 * H : 4 * H], out=act[:, 3 * H :])
    f, i, o, g = act[:, :H], act[:, H : 2 * H], act[:, 2 * H : 3 * H], act[:, 3 * H :]
    torch.addcmul(k, u, f, out=c_out)
    c_out.mul_(c_prev).addcmul_(i * g, u + zp)
    torch.lerp(torch.tanh(c_out).mul_(o), h_prev, k, out=h_out)


def _forward(meta: _Meta, x_proj: Tensor, weights, biases, flat_state, keep: _Kept | None):
    """The time loop. With ``keep``, stores what the backward pass needs and the
    estimator's graphs; without, it is plain inference."""
    L = meta.layers
    B, T, _ = x_proj.shape
    dtype, device = x_proj.dtype, x_proj.device
    sizes = [w.shape[0] // 4 for w in weights]
    h = [flat_state[3 * l] for l in range(L)]
    c = [flat_state[3 * l + 1] for l in range(L)]
    z = [flat_state[3 * l + 2] for l in range(L)]
    w_mm = [w.to(meta.mm_dtype) if meta.mm_dtype else w for w in weights]
    xb = (x_proj + biases[0]).transpose(0, 1).contiguous()  # [T, B, 4H + 1]
    hidden = [x_proj.new_empty(B, T, H) for H in sizes]
    z_all = x_proj.new_zeros(B, T, L)
    logits = x_proj.new_empty(B, T, L - 1)
    steps = T if keep is not None else 1
    inputs = [x_proj.new_empty(steps, B, w.shape[1]) for w in weights]
    gates = [x_proj.new_empty(steps, B, 4 * H) for H in sizes]
    if keep is not None:
        keep.inputs, keep.gates = inputs, gates
        keep.cells = [x_proj.new_empty(T, B, H) for H in sizes]
        keep.estimates = x_proj.new_empty(B, T, L - 1)
    ones = torch.ones(B, 1, dtype=dtype, device=device)
    zeros = torch.zeros(B, dtype=dtype, device=device)
    for t in range(T):
        slot = t if keep is not None else 0
        zb = ones
        for l in range(L):
            H = sizes[l]
            a = inputs[l][slot]
            a[:, :H] = h[l]
            col = H
            zp = z[l].unsqueeze(-1)
            if l + 1 < L:
                torch.mul(h[l + 1], zp, out=a[:, col : col + sizes[l + 1]])
                col += sizes[l + 1]
            if l > 0:
                torch.mul(h[l - 1], zb, out=a[:, col:])
            bias = xb[t] if l == 0 else biases[l]
            if meta.skip_rows:  # the three terms apart, each gated term on its open rows only
                s = _affine(bias, a[:, :H], w_mm[l][:, :H], meta.mm_dtype)
                col = H
                if l + 1 < L:
                    _gated_addmm_(s, zp, a[:, col : col + sizes[l + 1]], w_mm[l][:, col : col + sizes[l + 1]], meta.mm_dtype)
                    col += sizes[l + 1]
                if l > 0:
                    _gated_addmm_(s, zb, a[:, col:], w_mm[l][:, col:], meta.mm_dtype)
            else:
                s = _affine(bias, a, w_mm[l], meta.mm_dtype)
            ops = select_operations(zb.squeeze(-1), z[l])
            u, k = ops.update, ops.copy
            c_new = keep.cells[l][t] if keep is not None else torch.empty_like(c[l])
            _cell_forward(s, c[l], h[l], u, k, zp, gates[l][slot], c_new, hidden[l][:, t])
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
                z_new = k1 * z[l] + (1.0 - k1) * e
            else:
                z_new = zeros
            z_all[:, t, l] = z_new
            h[l], c[l], z[l] = hidden[l][:, t], c_new, z_new
            zb = z_new.unsqueeze(-1)
    final = [t for l in range(L) for t in (h[l].clone(), c[l].clone(), z[l].clone())]
    return (*hidden, z_all, logits, *final)


class _HMLSTMSequence(torch.autograd.Function):
    """Inputs: meta, x_proj, L weights, L biases, (h, c, z) per layer.
    Outputs: L hidden sequences, boundaries, logits, (h, c, z) per layer."""

    @staticmethod
    def forward(ctx, meta: _Meta, x_proj: Tensor, *rest: Tensor):  # type: ignore[override]
        L = meta.layers
        weights, biases, flat_state = list(rest[:L]), list(rest[L : 2 * L]), list(rest[2 * L :])
        keep = _Kept()
        with torch.autocast(x_proj.device.type, enabled=False):
            outs = _forward(meta, x_proj, weights, biases, flat_state, keep)
        ctx.meta, ctx.keep = meta, keep
        ctx.save_for_backward(*weights, *flat_state, *outs[:L], outs[L])
        return outs

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: Tensor):  # type: ignore[override]
        meta, keep = ctx.meta, ctx.keep
        L = meta.layers
        saved = ctx.saved_tensors
        weights = saved[:L]
        flat_state = saved[L : 4 * L]
        hidden = saved[4 * L : 5 * L]
        z_all = saved[5 * L]
        with torch.autocast(weights[0].device.type, enabled=False):
            out = _backward(meta, keep, weights, flat_state, hidden, z_all, grads)
        ctx.keep = None  # free the stored activations now, not when the graph goes
        return (None, *out)


def _zero_if_none(g: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if g is None else g


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """``sum(a * b)`` over the last axis, kept as ``[B, 1]``."""
    return torch.linalg.vecdot(a, b).unsqueeze(-1)


def _cell_backward(act, c_t, c_prev, h_prev, u, k, zp, dh, dc, ds):
    """The chain rule of :func:`_cell_forward`: writes ``d s[:, :4H]`` into ``ds`` and returns
    ``(dc_prev, dh_prev, du, dk, dzp)`` where ``dh_prev`` is only the part through COPY and
    ``dzp`` only the part through FLUSH (the caller adds the matrix-product parts)."""
    H = c_t.shape[-1]
    f, i, o, g = act[:, :H], act[:, H : 2 * H], act[:, 2 * H : 3 * H], act[:, 3 * H :]
    tc = torch.tanh(c_t)
    h_new = o * tc
    dh_new = (1.0 - k) * dh
    dk = _rowdot(h_prev - h_new, dh)
    torch.mul(tc * dh_new, o * (1.0 - o), out=ds[:, 2 * H : 3 * H])  # output gate
    dct = torch.addcmul(dc, o * dh_new, 1.0 - tc * tc)
    torch.mul(u * c_prev * dct, f * (1.0 - f), out=ds[:, :H])  # forget gate
    uz_dct = (u + zp) * dct
    torch.mul(uz_dct * g, i * (1.0 - i), out=ds[:, H : 2 * H])  # input gate
    torch.mul(uz_dct * i, 1.0 - g * g, out=ds[:, 3 * H : 4 * H])  # candidate
    dc_prev = torch.addcmul(k, u, f) * dct
    ig = i * g
    du = _rowdot(torch.addcmul(ig, f, c_prev), dct)
    dzp = _rowdot(ig, dct)  # FLUSH's weight is z_prev itself
    dk = dk + _rowdot(c_prev, dct)
    return dc_prev, k * dh, du, dk, dzp


def _backward(meta: _Meta, keep: _Kept, weights, flat_state, hidden, z_all, grads):
    L = meta.layers
    B, T, _ = z_all.shape
    sizes = [w.shape[0] // 4 for w in weights]
    mm_dtype = meta.mm_dtype
    w_t = [(w.to(mm_dtype) if mm_dtype else w).t().contiguous() for w in weights]  # for ds @ W
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
    d_pre = [hidden[l].new_empty(T, B, 4 * sizes[l] + 1) for l in range(L)]  # ds of every step
    ones = z_all.new_ones(B)  # z^0_t: the input always "ends a segment"
    live_rows = [torch.ones(T, B, dtype=torch.bool, device=z_all.device) for _ in range(L)]  # ds row not 0
    for t in range(T - 1, -1, -1):
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
            ds = d_pre[l][t]
            dc_next[l], dh_prev, du, dk, dzp = _cell_backward(
                keep.gates[l][t], keep.cells[l][t], c_prev, h_prev, u, k, zp, dh, dc_next[l], ds
            )
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
            h_above = (hidden[l + 1][:, t - 1] if t > 0 else h0[l + 1]) if not top else None
            h_below = hidden[l - 1][:, t] if l > 0 else None
            # one product for the three terms: the closed rows of a gated term still need it,
            # for the straight-through gradient of the boundary that closed them. Rows in COPY
            # have ds = 0 exactly (every gate term carries a factor u, u + z_prev or 1 - k), so
            # unless something outside gave their logit a gradient they are left out.
            live = None
            if meta.skip_rows and l > 0:
                live_mask = (k.squeeze(-1) != 1) | (ds[:, 4 * H] != 0)
                live_rows[l][t] = live_mask
                live = live_mask.nonzero().squeeze(-1)
            if live is None or live.numel() == B:
                da = _linear(ds, w_t[l], mm_dtype)
            else:
                da = ds.new_zeros(B, w_t[l].shape[0])
                if live.numel() > 0:
                    da.index_copy_(0, live, _linear(ds.index_select(0, live), w_t[l], mm_dtype))
            dh_prev = dh_prev + da[:, :H]
            if not top:
                da_above = da[:, H : H + sizes[l + 1]]
                d_above, d_gate = zp * da_above, _rowdot(h_above, da_above)
            if l > 0:
                da_below = da[:, da.shape[1] - sizes[l - 1] :]
                d_below, d_gate_below = zb * da_below, _rowdot(h_below, da_below)
            if not top:
                dh_next[l + 1] = dh_next[l + 1] + d_above  # layer l+1 at step t is done
                dzp = dzp + d_gate
            if l > 0:
                dh_from_above = d_below
                dz_from_above = dzb + d_gate_below
            dh_next[l] = dh_prev
            dz_next[l] = dzp
    # weight gradients: one product over all steps
    d_weights, d_biases = [], []
    for l in range(L):
        ds_all = d_pre[l].flatten(0, 1)
        a_all = keep.inputs[l].flatten(0, 1)
        if meta.skip_rows:  # leave out rows with ds = 0 (COPY) and rows a closed gate zeroed
            H = sizes[l]
            live = live_rows[l].flatten()
            rows = live.nonzero().squeeze(-1)
            if rows.numel() == live.numel():
                parts = [_matmul(ds_all.t(), a_all[:, :H], mm_dtype)]
            else:
                parts = [_matmul(ds_all.index_select(0, rows).t(), a_all[:, :H].index_select(0, rows), mm_dtype)]
            gates = []
            if l + 1 < L:
                gates.append((torch.cat([z0[l].unsqueeze(0), z_all[:, :-1, l].t()]), sizes[l + 1]))
            if l > 0:
                gates.append((z_all[:, :, l - 1].t(), sizes[l - 1]))
            col = H
            for gate, width in gates:
                rows = ((gate.flatten() != 0) & live).nonzero().squeeze(-1)
                block = a_all[:, col : col + width].index_select(0, rows)
                parts.append(_matmul(ds_all.index_select(0, rows).t(), block, mm_dtype))
                col += width
            d_weights.append(torch.cat(parts, dim=1).to(weights[l].dtype))
        else:
            d_weights.append(_matmul(ds_all.t(), a_all, mm_dtype).to(weights[l].dtype))
        d_biases.append(ds_all.sum(0).to(weights[l].dtype))
    d_state = [t for l in range(L) for t in (dh_next[l], dc_next[l], dz_next[l].squeeze(-1))]
    return (d_pre[0].transpose(0, 1), *d_weights, *d_biases, *d_state)
