"""GPU path for HM-LSTM stacks: a training window as matrix products and Triton kernels.

Per layer and step, forward: one matrix product ``a_t [U_l; U_{l+1}; W_{l-1}]^T`` of the gated
inputs ``a_t = [h^l_{t-1}, z^l_{t-1} h^{l+1}_{t-1}, z^{l-1}_t h^{l-1}_t]`` (gating the input rows
equals gating the terms, which are linear), then one
:func:`~hmrnn_lightning.cells.hm_lstm_kernel.triton_kernels` forward kernel, which does
everything pointwise: the gate activations, the boundary estimator, UPDATE / COPY / FLUSH,
the cell's layer norm; writes ``c``, ``h``, ``z``; and writes ``h``, gated, into the inputs of
the products that read it next (its own next step's, the layer below's next step's, the layer
above's this step's), so no copy or gating runs between the products. With layer norm the
bottom-up term is normalised on its own (:class:`~hmrnn_lightning.cells.base.HMCell` says why),
so it is a second product, normalised inside the kernel. The first layer's input term is one
product over the whole window before the loop. Backward, per layer and step: one kernel,
then one product ``ds_t [U_l; U_{l+1}; W_{l-1}]`` (two with layer norm) whose blocks are the
gradients of the inputs; the weight gradients are one product per weight over the window,
``sum_t ds_t^T a_t``, from the kept inputs.

Everything is dense and the shapes are static: no row is skipped and nothing is read back
to the host inside the window, so a GPU never waits on the CPU and the window can be
captured in a CUDA graph (:class:`~hmrnn_lightning.cells.stack.HMStack`'s ``cuda_graph``).
(The CPU path, :mod:`~hmrnn_lightning.cells.sequence`, skips closed rows instead, which
pays on a CPU.)

How the gradients of a gated term reach the row that owns its gate. A term ``z W h`` has
two gradients: ``z (ds W)`` for ``h`` and ``<W h, ds> = <h, ds W>`` for ``z``. The product
``ds W`` is kept ungated, and the kernel of the layer and step that produced ``h`` (and knows
``h``) applies both: the top-down term of layer ``l`` at step ``t`` reads ``h^{l+1}_{t-1}`` and
is gated by ``z^l_{t-1}``, which is the gate ``z_below`` of layer ``l+1`` at step ``t-1``; the
bottom-up term of layer ``l+1`` at step ``t`` reads ``h^l_t`` and is gated by ``z^l_t``, layer
``l``'s own. The normalised bottom-up term needs ``LN(W h)``, so its kernel keeps the product
and computes ``<LN(W h), ds>`` itself.

Saved for the backward pass: per layer the pre-activation ``s`` of every step (overwritten in
place by ``ds`` in the backward pass, then the weight gradients' left factor), the gated
inputs ``a_t``, ``c``, ``h``, and with layer norm the bottom-up product (overwritten by its
gradient).

Mixed precision: under autocast the products run in the autocast dtype; states, ``s``, the
kernels and the boundary decisions are fp32. The kernels see fp32 tensors only, so the same
code runs under Triton's interpreter on a CPU, where the tests run it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from hmrnn_lightning.cells.base import LayerState
from hmrnn_lightning.cells.hm_lstm_kernel import (
    BERNOULLI, GIVEN, InputLayout, LayerWeights, block_size, estimator_mode, first_layer_input, flatten_layers,
    flatten_states, layout_problem, matmul_dtype, num_warps, rowdot, triton_kernels, unflatten_layers, window_outputs,
)


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """Triton's interpreter is on (``TRITON_INTERPRET=1``): kernels run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def why_not(stack) -> str | None:
    """None when this path can run ``stack``; else the reason."""
    for cell in stack.cells:
        problem = layout_problem(cell)
        if problem is not None:
            return problem
    if estimator_mode(stack.estimator) is None:
        return f"it runs the step, Bernoulli and soft estimators only, not {type(stack.estimator).__name__}"
    if not triton_available():
        return "Triton is not installed (pip install 'hmrnn-lightning[gpu]')"
    return None


@dataclass
class _Meta:
    """The non-tensor inputs of the autograd function."""

    names: list[list[str]]
    mode: int  # hm_lstm_kernel.GIVEN / STEP / BERNOULLI / SOFT
    given: Tensor | None  # [T, L - 1, B]: the boundaries (GIVEN) or uniform noise (BERNOULLI)
    slope: Tensor
    mm_dtype: torch.dtype | None
    eps: float


def window_forward(stack, x: Tensor, state: list[LayerState], boundaries: Tensor | None):
    """The body of :meth:`HMStack.forward` on this path; returns ``(hidden, boundaries,
    logits, state)`` like :func:`~hmrnn_lightning.cells.sequence.sequence_forward`."""
    mm_dtype = matmul_dtype(x)
    dtype = stack.state_dtype(x)
    first = stack.cells[0]
    L = len(stack.cells)
    B, T, _ = x.shape
    mode = estimator_mode(stack.estimator)
    given = None
    if boundaries is not None:
        mode, given = GIVEN, boundaries.to(dtype).permute(1, 2, 0).contiguous()
    elif mode == BERNOULLI:  # drawn here, on the device's generator: reproducible and capturable
        given = torch.rand(T, max(L - 1, 1), B, device=x.device, dtype=dtype)
    x_in = first_layer_input(stack, x, dtype)
    layers = [LayerWeights.from_cell(cell) for cell in stack.cells]
    names, flat_weights = flatten_layers(layers)
    flat_state = [t.contiguous() for t in flatten_states(state)]
    eps = first.norm_cell.eps if first.layer_norm else 0.0
    meta = _Meta(names, mode, given, stack.estimator.slope.to(x.device, dtype), mm_dtype, eps)
    tensors = [x_in, *flat_weights, *flat_state]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        outs = _Window.apply(meta, *tensors)
    else:
        with torch.no_grad():
            outs, _ = _forward(meta, x_in, layers, flat_state, keep=False)
    return window_outputs(outs, L)


def _mm(a: Tensor, w_t: Tensor, mm_dtype, out: Tensor | None = None, base: Tensor | None = None) -> Tensor:
    """``base + a @ w_t`` (into ``out``); under autocast the product in ``mm_dtype``."""
    if mm_dtype is None:
        if base is not None:
            return torch.addmm(base, a, w_t, out=out) if out is not None else torch.addmm(base, a, w_t)
        return torch.mm(a, w_t, out=out) if out is not None else torch.mm(a, w_t)
    product = a.to(mm_dtype) @ w_t
    if out is None:
        out = product.to(a.dtype if a.dtype != mm_dtype else torch.float32)
    else:
        out.copy_(product)
    return out.add_(base) if base is not None else out


def _accumulate(acc: Tensor, a: Tensor, w: Tensor, mm_dtype) -> None:
    """``acc += a @ w`` in place."""
    if mm_dtype is None:
        acc.addmm_(a, w)
    else:
        acc.add_(a.to(mm_dtype) @ w)


class _Saved:
    """What the backward pass reads, time-major (``[T, B, ...]``)."""

    def __init__(self) -> None:
        self.s: list[Tensor] = []  # pre-activations, then ds
        self.inputs: list[Tensor] = []  # the merged product's gated inputs a_t (see InputLayout)
        self.below: list[Tensor | None] = []  # with LN, the bottom-up products, then their gradients
        self.c: list[Tensor] = []
        self.h: list[Tensor] = []
        self.z: Tensor | None = None  # [T, L, B]
        self.e: Tensor | None = None  # [T, L - 1, B], the estimator's decisions before COPY keeps z
        self.x_in: Tensor | None = None


def _forward(meta: _Meta, x_in: Tensor, layers: list[LayerWeights], flat_state: list[Tensor], keep: bool):
    forward_kernel, _ = triton_kernels()
    L = len(layers)
    B, T, _ = x_in.shape
    ln = layers[0].layer_norm
    sizes = [w.hidden_size for w in layers]
    lay = InputLayout(sizes, ln)
    mm = meta.mm_dtype
    cast = (lambda w: w.to(mm)) if mm else (lambda w: w)
    new = x_in.new_empty
    slots = T if keep else 1  # inference keeps one slot, which the kernels overwrite in order
    S = [new(slots, B, 4 * H + 1) for H in sizes]
    A = [new(slots, B, lay.width[l]) for l in range(L)]
    C = [new(T, B, H) for H in sizes]
    Hd = [new(T, B, H) for H in sizes]
    Z = x_in.new_zeros(T, L, B)
    E = new(T, max(L - 1, 1), B)
    LG = new(T, max(L - 1, 1), B)
    h0, c0, z0 = flat_state[0::3], flat_state[1::3], flat_state[2::3]
    for l in range(L):  # step 0's recurrent and top-down inputs come from the initial state
        A[l][0, :, : sizes[l]] = h0[l]
        if l + 1 < L:
            torch.mul(h0[l + 1], z0[l].unsqueeze(-1), out=A[l][0, :, lay.above_start[l] : lay.below_start[l]])
    R: list[Tensor | None] = [None] * L
    if ln:
        x_tm = x_in.transpose(0, 1).reshape(T * B, -1)
        R[0] = _mm(x_tm, cast(layers[0].bottom_up).t(), mm).view(T, B, -1)
        for l in range(1, L):
            R[l] = new(slots, B, 4 * sizes[l] + 1)
        base0 = None
    else:
        base0 = (x_in + layers[0].bias).transpose(0, 1).contiguous()  # [T, B, 4H + 1]
    w_merged = [cast(w.merged(lay.with_bottom_up[l])).t() for l, w in enumerate(layers)]  # [K, 4H + 1]
    w_below = [cast(w.bottom_up).t() for w in layers]
    for t in range(T):
        slot = t if keep else 0
        nxt = t + 1 if keep else 0
        writes_next = not keep or t + 1 < T
        for l in range(L):
            w = layers[l]
            H = sizes[l]
            top = l + 1 == L
            s = S[l][slot]
            base = base0[t] if (l == 0 and not ln) else w.bias
            # fp32: the bias goes into the product; under autocast the kernel adds it
            _mm(A[l][slot], w_merged[l], mm, out=s, base=base if mm is None else None)
            below = None
            if ln:
                below = R[l][slot] if l > 0 else R[0][t]
                if l > 0:
                    _mm(Hd[l - 1][t], w_below[l], mm, out=below)
            given = meta.given[t, l] if (meta.given is not None and not top) else s
            own = A[l][nxt] if writes_next else s
            up = A[l - 1][nxt, :, lay.above_start[l - 1] :] if (l > 0 and writes_next) else s
            down = A[l + 1][slot, :, lay.below_start[l + 1] :] if (not top and lay.with_bottom_up[l + 1]) else s
            forward_kernel[(B,)](
                s, below if below is not None else s, base if mm is not None else s,
                w.below_gamma if ln else s, w.below_beta if ln else s,
                C[l][t - 1] if t else c0[l],
                Hd[l][t - 1] if t else h0[l], Z[t - 1, l] if t else z0[l], Z[t, l - 1] if l > 0 else s,
                w.cell_gamma if ln else s, w.cell_beta if ln else s,
                given, meta.slope, C[l][t], Hd[l][t], Z[t, l], E[t, min(l, L - 2)] if not top else s,
                LG[t, min(l, L - 2)] if not top else s,
                own, lay.width[l], up, lay.width[l - 1] if l > 0 else 0, down, lay.width[l + 1] if not top else 0,
                meta.eps,
                H=H, BLOCK=block_size(H), HAS_BASE=mm is not None, BASE_ROWS=(l == 0 and not ln),
                HAS_BELOW=below is not None, BELOW_GATED=l > 0, NORM_BELOW=ln, NORM_CELL=ln, TOP=top, MODE=meta.mode,
                WRITE_OWN=writes_next, WRITE_UP=l > 0 and writes_next, WRITE_DOWN=down is not s,
                num_warps=num_warps(H),
            )
    hidden = [h.transpose(0, 1) for h in Hd]
    z_all = Z.permute(2, 0, 1)
    logits = LG[:, : L - 1].permute(2, 0, 1)
    final = [t for l in range(L) for t in (Hd[l][T - 1].clone(), C[l][T - 1].clone(), Z[T - 1, l].clone())]
    saved = None
    if keep:
        saved = _Saved()
        saved.s, saved.inputs, saved.c, saved.h, saved.z, saved.e = S, A, C, Hd, Z, E
        saved.below = R if ln else [None] * L
        saved.x_in = x_in if ln else None
    return (*hidden, z_all, logits, *final), saved


class _Window(torch.autograd.Function):
    """Inputs: meta, x_in, the tensors of each layer's :class:`LayerWeights`, (h, c, z) per layer.
    Outputs: L hidden sequences, boundaries, logits, (h, c, z) per layer."""

    @staticmethod
    def forward(ctx, meta: _Meta, x_in: Tensor, *rest: Tensor):  # type: ignore[override]
        n = sum(len(names) for names in meta.names)
        flat_weights, flat_state = list(rest[:n]), list(rest[n:])
        layers = unflatten_layers(meta.names, flat_weights)
        with torch.autocast(x_in.device.type, enabled=False):
            outs, saved = _forward(meta, x_in, layers, flat_state, keep=True)
        ctx.meta, ctx.saved, ctx.layers, ctx.flat_state = meta, saved, layers, flat_state
        ctx.x_shape = x_in.shape
        return outs

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: Tensor):  # type: ignore[override]
        with torch.autocast(grads[0].device.type if grads[0] is not None else "cpu", enabled=False):
            out = _backward(ctx.meta, ctx.saved, ctx.layers, ctx.flat_state, ctx.x_shape, grads)
        ctx.saved = None  # free the stored activations now, not when the graph goes
        return (None, *out)


def _time_major(g: Tensor | None) -> Tensor | None:
    return None if g is None else g.transpose(0, 1).contiguous()


def _backward(meta: _Meta, saved: _Saved, layers: list[LayerWeights], flat_state, x_shape, grads):
    _, backward_kernel = triton_kernels()
    L = len(layers)
    B, T, _ = x_shape
    ln = layers[0].layer_norm
    sizes = [w.hidden_size for w in layers]
    lay = InputLayout(sizes, ln)
    mm = meta.mm_dtype
    cast = (lambda w: w.to(mm)) if mm else (lambda w: w)
    S, A, R, C, Hd, Z, E = saved.s, saved.inputs, saved.below, saved.c, saved.h, saved.z, saved.e
    h0, c0, z0 = flat_state[0::3], flat_state[1::3], flat_state[2::3]
    g_hidden = [_time_major(grads[l]) for l in range(L)]
    g_z = None if grads[L] is None else grads[L].permute(1, 2, 0).contiguous()  # [T, L, B]
    g_logits = None if grads[L + 1] is None else grads[L + 1].permute(1, 2, 0).contiguous()  # [T, L - 1, B]
    g_final = grads[L + 2 :]

    def start(g, like):
        return torch.zeros_like(like) if g is None else g.contiguous().clone()

    DH = [start(g_final[3 * l], h0[l]) for l in range(L)]  # d h^l_t, accumulated
    DC = [start(g_final[3 * l + 1], c0[l]) for l in range(L)]
    DZ = [start(g_final[3 * l + 2], z0[l]) for l in range(L)]
    DZ[L - 1].zero_()  # the top layer's z is a constant
    # per layer ds_t W_merged, [B, K]: the gradients of the merged product's inputs, ungated; the
    # kernels that own h (and the gates) read their blocks
    DA = [h0[l].new_zeros(B, lay.width[l]) for l in range(L)]
    # built again rather than kept from the forward pass: kept, they would add about 50 MB a
    # layer to the peak at the Text8 shape; building them is one concatenation per layer
    w_merged = [cast(w.merged(lay.with_bottom_up[l])) for l, w in enumerate(layers)]  # [4H + 1, K]
    w_below = [cast(w.bottom_up) for w in layers]
    rows_gb = [torch.zeros(B, 4 * H + 1, dtype=C[0].dtype, device=C[0].device) if ln else None for H in sizes]
    rows_bb = [torch.zeros_like(r) if r is not None else None for r in rows_gb]
    rows_gc = [C[l].new_zeros(B, sizes[l]) if ln else None for l in range(L)]
    rows_bc = [torch.zeros_like(r) if r is not None else None for r in rows_gc]
    for t in range(T - 1, -1, -1):
        for l in range(L - 1, -1, -1):
            w = layers[l]
            H = sizes[l]
            top = l + 1 == L
            s = S[l][t]
            below = R[l][t] if ln else None
            dummy = s
            has_dxb = not top and lay.with_bottom_up[l + 1]
            backward_kernel[(B,)](
                s, below if below is not None else dummy,
                w.below_gamma if ln else dummy, w.below_beta if ln else dummy,
                rows_gb[l] if ln else dummy, rows_bb[l] if ln else dummy,
                C[l][t], C[l][t - 1] if t else c0[l], Hd[l][t - 1] if t else h0[l], Hd[l][t],
                Z[t - 1, l] if t else z0[l], Z[t, l - 1] if l > 0 else dummy,
                E[t, l] if not top else dummy, meta.slope,
                w.cell_gamma if ln else dummy, w.cell_beta if ln else dummy,
                rows_gc[l] if ln else dummy, rows_bc[l] if ln else dummy,
                g_hidden[l][t] if g_hidden[l] is not None else dummy, DH[l], DC[l], DZ[l],
                g_z[t, l] if (g_z is not None and not top) else dummy,
                g_logits[t, l] if (g_logits is not None and not top) else dummy,
                DA[l], lay.width[l],
                DA[l - 1][:, lay.above_start[l - 1] :] if l > 0 else dummy, lay.width[l - 1] if l > 0 else 0,
                DA[l + 1][:, lay.below_start[l + 1] :] if has_dxb else dummy, lay.width[l + 1] if has_dxb else 0,
                DZ[l - 1] if l > 0 else dummy, Z[t, l], meta.eps,
                H=H, BLOCK=block_size(H), HAS_BELOW=ln, BELOW_GATED=l > 0, NORM_BELOW=ln, NORM_CELL=ln,
                TOP=top, MODE=meta.mode if not top else GIVEN, HAS_GH=g_hidden[l] is not None,
                HAS_GZ=g_z is not None and not top, HAS_GLOGIT=g_logits is not None and not top,
                HAS_DREC=t + 1 < T, HAS_DXA=l > 0 and t + 1 < T, HAS_DXB=has_dxb, num_warps=num_warps(H),
            )
            # s now holds ds; DH[l] the COPY part of d h^l_{t-1}. One product for the merged
            # inputs (the kernels of (t - 1, l), (t - 1, l + 1) and (t, l - 1) read its blocks)
            _mm(s, w_merged[l], mm, out=DA[l])
            if ln and l > 0:  # the normalised bottom-up term: gated d raw, straight into d h^{l-1}_t
                _accumulate(DH[l - 1], below, w_below[l], mm)
    # the initial state: step 0's recurrent and top-down terms read h_{-1}; the latter is gated by z^l_{-1}
    d_h0 = [DH[l] + DA[l][:, : sizes[l]] for l in range(L)]
    for l in range(1, L):
        d_h0[l] = d_h0[l] + z0[l - 1].unsqueeze(-1) * DA[l - 1][:, lay.above_start[l - 1] : lay.below_start[l - 1]]
    d_z0 = [DZ[l] + (rowdot(h0[l + 1], DA[l][:, lay.above_start[l] : lay.below_start[l]]).squeeze(-1) if l + 1 < L else 0.0)
            for l in range(L)]
    # weight gradients: one product per weight over the window
    flat = []
    for l, w in enumerate(layers):
        dS = S[l].reshape(T * B, -1)
        grads_l = w.split_merged(_mm(dS.t(), cast(A[l].reshape(T * B, -1)), mm), lay.with_bottom_up[l])
        grads_l["bias"] = dS.sum(0)
        if ln:
            d_raw = R[l].reshape(T * B, -1)
            below_in = saved.x_in.transpose(0, 1) if l == 0 else Hd[l - 1]
            grads_l["bottom_up"] = _mm(d_raw.t(), cast(below_in.reshape(T * B, -1)), mm)
            grads_l["below_gamma"], grads_l["below_beta"] = rows_gb[l].sum(0), rows_bb[l].sum(0)
            grads_l["cell_gamma"], grads_l["cell_beta"] = rows_gc[l].sum(0), rows_bc[l].sum(0)
        for name in meta.names[l]:
            g = grads_l.get(name)  # the first layer's W without LN: autograd's, through x_in
            flat.append(None if g is None else g.to(getattr(w, name).dtype))
    if ln:
        dx = _mm(R[0].reshape(T * B, -1), w_below[0], mm).view(T, B, -1).transpose(0, 1)
    else:
        dx = S[0].transpose(0, 1)  # the gradient of x_in = W x + b
    d_state = [t for l in range(L) for t in (d_h0[l], DC[l], d_z0[l])]
    return (dx, *flat, *d_state)
