"""The GPU's backend: a window as matrix products and Triton kernels, dense and static.

Per layer and step, forward: one product ``a_t [U_l; U_{l+1}; W_{l-1}]^T`` of the gated inputs
``a_t = [h^l_{t-1}, z^l_{t-1} h^{l+1}_{t-1}, z^{l-1}_t h^{l-1}_t]`` (gating rows equals gating the
linear terms); with layer norm the bottom-up term is a second product, normalised in the kernel;
the first layer's input term is one product over the window. Then one kernel for everything
pointwise, which also writes ``h``, gated, into the inputs of the products that read it next.
Backward: one kernel, then one product ``ds_t W_merged`` (two with layer norm), kept ungated; a
gated term ``z W h`` has gradients ``z (ds W)`` for ``h`` and ``<h, ds W>`` for ``z``, applied by
the kernel that produced ``h``. Weight gradients: one product per weight over the window.

Nothing is read back to the host inside a window, so it can be captured in a CUDA graph. The
kernels compute in fp32 whatever the product dtype, so the interpreter runs them on a CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

from hmrnn_lightning.cells.operations import TOP_LAYER_Z
from hmrnn_lightning.engine import kernels as K
from hmrnn_lightning.engine.backend import Backend, run_window
from hmrnn_lightning.engine.plan import (
    BERNOULLI, GIVEN, WindowCache, WindowPlan, fast_path_problem, kernel_mode, padded, padded_row,
)
from hmrnn_lightning.engine.pointwise import rowdot
from hmrnn_lightning.engine.products import accumulate, linear, matmul
from hmrnn_lightning.states import LayerState


def interpreting() -> bool:
    """Triton's interpreter is on (``TRITON_INTERPRET=1``): kernels run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_ALL = slice(None)


def _from(start: int) -> slice:
    return slice(start, None)


@dataclass
class _Launch:
    """A window's per-call settings: the kernels' estimator rule, ``given`` boundaries or noise
    ``[T, L - 1, B]`` (GIVEN / BERNOULLI), and the slope (a 1-element tensor on the device)."""

    plan: WindowPlan
    mode: int
    given: Tensor | None
    slope: Tensor
    kernels: tuple | None = None  # (step_forward, step_backward) launched alike; None: the Triton kernels

    def at(self, tensor: Tensor | None, *index: int | slice):
        """A kernel argument: ``tensor[index]`` (ints, and ``slice(start, None)``); for the fused
        CPU kernels, which take addresses, that slice's address instead (Python arithmetic: 0.49 us
        against 1.76 us for a view; a profiled window at 3 x 128 made 10,588 views, 5% of its
        time, and makes 1,917 now). None stays None."""
        if tensor is None or self.kernels is None:
            return None if tensor is None else tensor[index]
        stride, offset = tensor.stride(), 0
        for k, i in enumerate(index):  # a loop, not sum() over a generator: 0.5 us against 0.9
            offset += (i if i.__class__ is int else (i.start or 0)) * stride[k]
        return tensor.data_ptr() + offset * tensor.element_size()


class TritonBackend(Backend):
    """Products and Triton kernels (:mod:`hmrnn_lightning.engine.triton_window`)."""

    name = "triton"

    def why_not(self, stack, device: torch.device | None = None) -> str | None:
        problem = fast_path_problem(stack.cells)
        if problem is not None:
            return problem
        if kernel_mode(stack.estimator) is None:
            return f"it runs the step, Bernoulli and soft estimators only, not {type(stack.estimator).__name__}"
        if K.triton is None:
            return "Triton is not installed (pip install 'hmrnn-lightning[gpu]')"
        if device is not None and device.type != "cuda" and not interpreting():
            return "it runs on CUDA tensors (on a CPU only under TRITON_INTERPRET=1)"
        return None

    def window(self, plan: WindowPlan, x: Tensor, state: list[LayerState], boundaries: Tensor | None):
        return window(plan, x, state, boundaries)


def window(plan: WindowPlan, x: Tensor, state: list[LayerState], boundaries: Tensor | None, kernels: tuple | None = None):
    """:meth:`TritonBackend.window`, with other kernels of the Triton kernels' launch contract
    where given (:mod:`~hmrnn_lightning.engine.cpu_fused`'s, which run this loop on a CPU)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    L = plan.num_layers
    B, T, _ = x.shape
    mode, given = kernel_mode(plan.estimator), None
    if boundaries is not None:
        mode, given = GIVEN, boundaries.to(dtype).permute(1, 2, 0).contiguous()
    elif mode == BERNOULLI:  # drawn here, on the device's generator: reproducible and capturable
        given = torch.rand(T, max(L - 1, 1), B, device=x.device, dtype=dtype)
    launch = _Launch(plan, mode, given, plan.estimator.slope.to(x.device, dtype), kernels)
    return run_window(_forward, _backward, launch, x, state)


def _product(launch: _Launch, a: Tensor, w_t: Tensor, out: Tensor, base: Tensor | None = None, aligned: bool = True) -> None:
    """``out = base + a @ w_t``. With the fused CPU kernels (no autocast) there is no ``base``
    (the kernel adds it) and the product is computed as ``(w_t^T a^T)^T``: straight into ``out``
    (its transpose is a column-major matrix, which MKL writes in place) where ``a``'s rows are
    :func:`padded` like ``out``'s, else into a new tensor copied into ``out`` (10-15% of a
    window at 3 x 128, for all products). MKL rounds by the operands' alignment, and a window
    split in two must equal one pass bit for bit
    (tests/cells/test_stack.py::test_two_halves_equal_one_pass)."""
    mm = launch.plan.product_dtype
    if launch.kernels is None or mm is not None:
        matmul(a, w_t, mm, out=out, base=base)
        return
    assert base is None, "the fused CPU kernels add the base themselves"
    if aligned:
        torch.mm(w_t.t(), a.t(), out=out.t())
    else:
        out.copy_(linear(a, w_t.t(), None))


class _Buffers:
    """The forward pass's buffers, time-major; ``slots`` steps of ``s``, ``a`` and the bottom-up
    product (all ``T`` in training, one in inference, overwritten in order). Pre-activation rows
    are :func:`padded_row` wide; ``s[l]`` and ``below[l]`` are their ``4H + 1`` views."""

    def __init__(self, plan: WindowPlan, x_in: Tensor, slots: int) -> None:
        B, T, _ = x_in.shape
        new = x_in.new_empty
        lay = plan.layout
        self.rows = [padded_row(H) for H in plan.sizes]
        self.s = [new(slots, B, R)[..., : 4 * H + 1] for R, H in zip(self.rows, plan.sizes)]
        self.a = [new(slots, B, padded(lay.width[l]))[..., : lay.width[l]] for l in range(plan.num_layers)]
        self.c = [new(T, B, H) for H in plan.sizes]
        self.h = [new(T, B, H) for H in plan.sizes]
        self.z = x_in.new_zeros(T, plan.num_layers, B)
        self.e = new(T, max(plan.num_layers - 1, 1), B)
        self.logits = new(T, max(plan.num_layers - 1, 1), B)
        self.below: list[Tensor | None] = [None] * plan.num_layers
        if plan.layer_norm:
            for l, (R, H) in enumerate(zip(self.rows, plan.sizes)):
                self.below[l] = new(T if l == 0 else slots, B, R)[..., : 4 * H + 1]


def _forward(launch: _Launch, x_in: Tensor, flat_weights: list[Tensor], flat_state: list[Tensor], keep: bool):
    """The time loop. ``x_in``: the first layer's input term ``[B, T, 4H + 1]`` without layer
    norm, the input ``[B, T, E]`` with it. Returns ``(flat outputs, WindowCache or None)``."""
    plan = launch.plan
    layers = plan.unflatten_weights(flat_weights)
    L, lay = plan.num_layers, plan.layout
    B, T, _ = x_in.shape
    buf = _Buffers(plan, x_in, T if keep else 1)
    h0, c0, z0 = flat_state[0::3], flat_state[1::3], flat_state[2::3]
    for l in range(L):  # step 0's recurrent and top-down inputs come from the initial state
        buf.a[l][0, :, : plan.sizes[l]] = h0[l]
        if l + 1 < L:
            torch.mul(h0[l + 1], z0[l].unsqueeze(-1), out=buf.a[l][0, :, lay.above_block(l)])
    merged, below = plan.product_weights(layers)
    w_merged, w_below = [w.t() for w in merged], [w.t() for w in below]  # [K, 4H + 1], [H_below, 4H + 1]
    base0 = None
    if plan.layer_norm:  # the first layer's input product over the window, into its padded rows
        _product(launch, x_in.transpose(0, 1).reshape(T * B, -1), w_below[0], buf.below[0].flatten(0, 1), aligned=False)
    else:
        base0 = (x_in + layers[0].bias).transpose(0, 1).contiguous()  # [T, B, 4H + 1]
    for t in range(T):
        for l in range(L):
            _forward_step(launch, buf, layers, w_merged[l], w_below[l], base0, h0, c0, z0, t, l, keep)
    hidden = [h.transpose(0, 1) for h in buf.h]
    final = [v for l in range(L) for v in (buf.h[l][T - 1].clone(), buf.c[l][T - 1].clone(), buf.z[T - 1, l].clone())]
    outs = (*hidden, buf.z.permute(2, 0, 1), buf.logits[:, : L - 1].permute(2, 0, 1), *final)
    cache = None
    if keep:
        cache = WindowCache(s=buf.s, inputs=buf.a, below=buf.below, c=buf.c, e=buf.e, h=buf.h, z=buf.z,
                            x_in=x_in if plan.layer_norm else None)
    return outs, cache


def _forward_step(launch: _Launch, buf: _Buffers, layers, w_merged: Tensor, w_below: Tensor, base0: Tensor | None,
                  h0, c0, z0, t: int, l: int, keep: bool) -> None:
    """Layer ``l`` at step ``t``: the product(s), then the forward kernel."""
    plan = launch.plan
    L, mm, lay, H = plan.num_layers, plan.product_dtype, plan.layout, plan.sizes[l]
    w, top, ln = layers[l], l + 1 == L, plan.layer_norm
    T = buf.c[l].shape[0]
    slot, nxt = (t, t + 1) if keep else (0, 0)
    writes_next = not keep or t + 1 < T
    s = buf.s[l][slot]
    base = base0[t] if base0 is not None and l == 0 else w.bias
    # the bias goes into the product on a GPU in fp32; the kernel adds it under autocast, and on
    # the CPU (the base rows of the first layer without layer norm are not aligned)
    kernel_base = mm is not None or launch.kernels is not None
    _product(launch, buf.a[l][slot], w_merged, s, base=None if kernel_base else base)
    below = None
    if ln:
        below = buf.below[l][slot] if l > 0 else buf.below[0][t]
        if l > 0:  # h's rows (and so its slots) are aligned like a's padded rows when H is a multiple of 16
            h_below = buf.h[l - 1][t]
            _product(launch, h_below, w_below, below, aligned=h_below.shape[1] % 16 == 0)
    at = launch.at
    down = at(buf.a[l + 1], slot, _ALL, _from(lay.below_start[l + 1])) if not top and lay.with_bottom_up[l + 1] else None
    up = at(buf.a[l - 1], nxt, _ALL, _from(lay.above_start[l - 1])) if l > 0 and writes_next else None
    (launch.kernels[0] if launch.kernels else K.step_forward)[(s.shape[0],)](
        s_ptr=s,  # [B, ROW]: the product in, the full pre-activation out
        base_ptr=base if kernel_base else None, base_stride=base.stride(0) if base.dim() == 2 else 0,  # [B or 1, 4H+1]
        below_ptr=below,  # [B, ROW]: the raw bottom-up product (layer norm)
        gb_ptr=w.below_gamma, bb_ptr=w.below_beta,  # [4H + 1]
        c_prev_ptr=at(buf.c[l], t - 1) if t else c0[l], h_prev_ptr=at(buf.h[l], t - 1) if t else h0[l],  # [B, H]
        zp_ptr=at(buf.z, t - 1, l) if t else z0[l], zb_ptr=at(buf.z, t, l - 1) if l > 0 else None,  # [B]
        gc_ptr=w.cell_gamma, bc_ptr=w.cell_beta,  # [H]
        given_ptr=at(launch.given, t, l) if not top else None,  # [B]
        slope_ptr=launch.slope,  # []
        c_ptr=at(buf.c[l], t), h_ptr=at(buf.h[l], t),  # [B, H] out
        z_ptr=at(buf.z, t, l), e_ptr=None if top else at(buf.e, t, l),  # [B] out
        logit_ptr=None if top else at(buf.logits, t, l),  # [B] out
        own_ptr=at(buf.a[l], nxt) if writes_next else None, own_stride=buf.a[l].stride(1),  # [B, K_l]
        up_ptr=up, up_stride=buf.a[l - 1].stride(1) if l > 0 else 0,  # [B, K_{l-1}] from the top-down block
        down_ptr=down, down_stride=buf.a[l + 1].stride(1) if not top else 0,  # [B, K_{l+1}] from the bottom-up block
        below_eps=plan.below_eps[l], cell_eps=plan.cell_eps[l], top_z=TOP_LAYER_Z,
        H=H, BLOCK=K.block_size(H), ROW=buf.rows[l], HAS_BASE=kernel_base, HAS_BELOW=below is not None,
        BELOW_GATED=l > 0, NORM_BELOW=ln, NORM_CELL=ln, TOP=top, MODE=launch.mode, WRITE_OWN=writes_next,
        WRITE_UP=up is not None, WRITE_DOWN=down is not None, num_warps=K.num_warps(H),
    )


class _Accumulators:
    """What the backward pass carries from step to step: the gradients reaching ``h``, ``c`` and
    ``z`` of each layer (``dh``, ``dc``, ``dz``), per layer ``ds_t W_merged`` ``[B, K]`` (``da``,
    the merged inputs' gradients, ungated: the kernels that own ``h`` read their blocks), and with
    layer norm the norms' parameter gradients per batch row."""

    def __init__(self, plan: WindowPlan, cache: WindowCache, flat_state, g_final, B: int) -> None:
        def start(g, like):
            return torch.zeros_like(like) if g is None else g.contiguous().clone()

        L, ln = plan.num_layers, plan.layer_norm
        self.dh = [start(g_final[3 * l], flat_state[3 * l]) for l in range(L)]
        self.dc = [start(g_final[3 * l + 1], flat_state[3 * l + 1]) for l in range(L)]
        self.dz = [start(g_final[3 * l + 2], flat_state[3 * l + 2]) for l in range(L)]
        self.dz[L - 1].zero_()  # the top layer's z is a constant
        self.da = [flat_state[0].new_zeros(B, plan.layout.width[l]) for l in range(L)]
        zeros = cache.c[0].new_zeros
        # padded rows like s (zeros_like would not keep the padded stride the kernels assume)
        self.gb = [zeros(B, padded_row(H))[:, : 4 * H + 1] if ln else None for H in plan.sizes]
        self.bb = [zeros(B, padded_row(H))[:, : 4 * H + 1] if ln else None for H in plan.sizes]
        self.gc = [zeros(B, H) if ln else None for H in plan.sizes]
        self.bc = [torch.zeros_like(r) if r is not None else None for r in self.gc]


def _backward(launch: _Launch, cache: WindowCache, flat_weights, flat_state, hidden, z_all, grads):
    plan = launch.plan
    layers = plan.unflatten_weights(flat_weights)
    L, mm = plan.num_layers, plan.product_dtype
    B, T, _ = z_all.shape
    g_hidden = [None if grads[l] is None else grads[l].transpose(0, 1).contiguous() for l in range(L)]
    g_z = None if grads[L] is None else grads[L].permute(1, 2, 0).contiguous()  # [T, L, B]
    g_logits = None if grads[L + 1] is None else grads[L + 1].permute(1, 2, 0).contiguous()  # [T, L - 1, B]
    acc = _Accumulators(plan, cache, flat_state, grads[L + 2 :], B)
    # built again rather than kept from the forward pass: kept, they would add about 50 MB a
    # layer to the peak at the Text8 shape; building them is one concatenation per layer
    w_merged, w_below = plan.product_weights(layers)  # [4H + 1, K], [4H + 1, H_below]
    for t in range(T - 1, -1, -1):
        for l in range(L - 1, -1, -1):
            _backward_step(launch, cache, acc, layers[l], flat_state, g_hidden[l], g_z, g_logits, t, l, T)
            # s now holds ds; one product for the merged inputs (the kernels of (t - 1, l),
            # (t - 1, l + 1) and (t, l - 1) read its blocks)
            matmul(cache.s[l][t], w_merged[l], mm, out=acc.da[l])
            if plan.layer_norm and l > 0:  # the normalised bottom-up term: gated d raw, straight into d h^{l-1}_t
                accumulate(acc.dh[l - 1], cache.below[l][t], w_below[l], mm)
    return _window_gradients(plan, cache, acc, layers, flat_state, w_below, T, B)


def _backward_step(launch: _Launch, cache: WindowCache, acc: _Accumulators, w, flat_state, g_hidden, g_z, g_logits,
                   t: int, l: int, T: int) -> None:
    """Layer ``l`` at step ``t`` backwards: the backward kernel."""
    plan = launch.plan
    L, lay, H, ln = plan.num_layers, plan.layout, plan.sizes[l], plan.layer_norm
    top = l + 1 == L
    h0, c0, z0 = flat_state[0::3], flat_state[1::3], flat_state[2::3]
    has_dxb = not top and lay.with_bottom_up[l + 1]
    s, at = cache.s[l][t], launch.at
    (launch.kernels[1] if launch.kernels else K.step_backward)[(s.shape[0],)](
        s_ptr=s,  # [B, ROW]: s in, ds out
        below_ptr=at(cache.below[l], t) if ln else None,  # [B, ROW]: the raw bottom-up product in, its gradient out
        gb_ptr=w.below_gamma, bb_ptr=w.below_beta, dgb_ptr=acc.gb[l], dbb_ptr=acc.bb[l],  # [4H + 1], [B, ROW]
        c_ptr=at(cache.c[l], t), c_prev_ptr=at(cache.c[l], t - 1) if t else c0[l],  # [B, H]
        h_prev_ptr=at(cache.h[l], t - 1) if t else h0[l], h_ptr=at(cache.h[l], t),  # [B, H]
        zp_ptr=at(cache.z, t - 1, l) if t else z0[l], zb_ptr=at(cache.z, t, l - 1) if l > 0 else None,  # [B]
        e_ptr=None if top else at(cache.e, t, l), slope_ptr=launch.slope,  # [B], []
        gc_ptr=w.cell_gamma, bc_ptr=w.cell_beta, dgc_ptr=acc.gc[l], dbc_ptr=acc.bc[l],  # [H], [B, H]
        gh_ptr=at(g_hidden, t),  # [B, H]
        dh_ptr=acc.dh[l], dc_ptr=acc.dc[l], dz_ptr=acc.dz[l],  # [B, H], [B, H], [B]
        gz_ptr=at(g_z, t, l) if not top else None,  # [B]
        glogit_ptr=at(g_logits, t, l) if not top else None,  # [B]
        drec_ptr=acc.da[l], drec_stride=lay.width[l],  # [B, K_l] from column 0
        dxa_ptr=at(acc.da[l - 1], _ALL, _from(lay.above_start[l - 1])) if l > 0 else None,  # [B, K_{l-1}]
        dxa_stride=lay.width[l - 1] if l > 0 else 0,
        dxb_ptr=at(acc.da[l + 1], _ALL, _from(lay.below_start[l + 1])) if has_dxb else None,  # [B, K_{l+1}]
        dxb_stride=lay.width[l + 1] if has_dxb else 0,
        dzb_ptr=acc.dz[l - 1] if l > 0 else None, z_ptr=at(cache.z, t, l),  # [B], [B]
        below_eps=plan.below_eps[l], cell_eps=plan.cell_eps[l],
        H=H, BLOCK=K.block_size(H), ROW=s.stride(0), HAS_BELOW=ln, BELOW_GATED=l > 0, NORM_CELL=ln, TOP=top,
        MODE=launch.mode if not top else GIVEN, HAS_GH=g_hidden is not None,
        HAS_GZ=g_z is not None and not top, HAS_GLOGIT=g_logits is not None and not top,
        HAS_DREC=t + 1 < T, HAS_DXA=l > 0 and t + 1 < T, HAS_DXB=has_dxb, FLUSH_GRAD=plan.flush_gradient,
        num_warps=K.num_warps(H),
    )


def _window_gradients(plan: WindowPlan, cache: WindowCache, acc: _Accumulators, layers, flat_state, w_below, T: int, B: int):
    """The gradients of the window function's inputs: ``x_in``, the flat weights (one product
    per weight over the window), the initial state."""
    L, mm, lay = plan.num_layers, plan.product_dtype, plan.layout
    h0, z0 = flat_state[0::3], flat_state[2::3]
    # the initial state: step 0's recurrent and top-down terms read h_{-1}; the latter is gated by z^l_{-1}
    d_h0 = [acc.dh[l] + acc.da[l][:, : plan.sizes[l]] for l in range(L)]
    for l in range(1, L):
        d_h0[l] = d_h0[l] + z0[l - 1].unsqueeze(-1) * acc.da[l - 1][:, lay.above_block(l - 1)]
    d_z0 = [acc.dz[l] + (rowdot(h0[l + 1], acc.da[l][:, lay.above_block(l)]).squeeze(-1) if l + 1 < L else 0.0)
            for l in range(L)]
    flat = []
    for l, w in enumerate(layers):
        dS = cache.s[l].flatten(0, 1)
        grads_l = w.split_merged(matmul(dS.t(), cache.inputs[l].reshape(T * B, -1), mm), lay.with_bottom_up[l])
        grads_l["bias"] = dS.sum(0)
        if plan.layer_norm:
            below_in = cache.x_in.transpose(0, 1) if l == 0 else cache.h[l - 1]
            grads_l["bottom_up"] = matmul(cache.below[l].flatten(0, 1).t(), below_in.reshape(T * B, -1), mm)
            grads_l["below_gamma"], grads_l["below_beta"] = acc.gb[l].sum(0), acc.bb[l].sum(0)
            grads_l["cell_gamma"], grads_l["cell_beta"] = acc.gc[l].sum(0), acc.bc[l].sum(0)
        for name in plan.names[l]:
            g = grads_l.get(name)  # the first layer's W without LN: autograd's, through x_in
            flat.append(None if g is None else g.to(getattr(w, name).dtype))
    if plan.layer_norm:
        dx = matmul(cache.below[0].flatten(0, 1), w_below[0], mm).view(T, B, -1).transpose(0, 1)
    else:
        dx = cache.s[0].transpose(0, 1)  # the gradient of x_in = W x + b
    d_state = [v for l in range(L) for v in (d_h0[l], acc.dc[l], d_z0[l])]
    return (dx, *flat, *d_state)
