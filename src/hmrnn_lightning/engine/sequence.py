"""The CPU's backend: one autograd function per window with the backward written by hand.

(Also what a GPU runs without Triton, or with an estimator the kernels lack; there it is dense.)

On a CPU with a C++ compiler, windows and generation steps with the step, Bernoulli or soft
estimator (or given boundaries), no autocast and layers up to
:data:`~hmrnn_lightning.engine.cpu_fused.MAX_HIDDEN` wide run instead as the Triton backend's
loop with compiled step kernels (:mod:`~hmrnn_lightning.engine.cpu_fused`; its ``why_not`` says
when not): at the CPU configs' size the loop below spends most of its time in the overhead of
its small operations. The loop below runs the rest (REINFORCE, plugins, autocast, wide layers).
It has the Triton backend's structure (:mod:`~hmrnn_lightning.engine.triton_window` describes
the products and the gradients of the gated terms), its saved tensors
(:class:`~hmrnn_lightning.engine.plan.WindowCache`) and the pointwise step of
:mod:`~hmrnn_lightning.engine.pointwise`. What is CPU-specific:

* rows whose contribution is zero are skipped (:data:`SKIP_GATED_ROWS`): in the forward the
  closed rows of a gated block (their straight-through gradient ``<h, ds W>`` needs no forward
  product); in the backward the rows in COPY, whose ``ds`` is 0; in a generation step
  (:meth:`SequenceBackend.step`, no gradient) the rows in COPY altogether, whose boundary logit
  then reads NaN. Training cannot skip COPY rows in the forward (the straight-through gradient
  of COPY needs the ``h`` and ``c`` an UPDATE would have made), nor the normalised bottom-up
  term's closed rows (its gate's gradient is ``<LN(W h), ds>``). Finding rows reads ``z`` on
  the host, which a GPU would wait for.
* the estimator module itself decides ``z``, called as in the reference (same order, so the
  same random draws); its small graph from logit to ``z`` is kept and differentiated per step,
  so every estimator's gradient rule carries over (REINFORCE, plugins). Estimators with
  trainable parameters would lose their gradients, so they are refused.
* the per-step products run as ``(W a^T)^T``, the faster order for MKL at these shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hmrnn_lightning.cells.operations import TOP_LAYER_Z, carry_boundary, select_operations
from hmrnn_lightning.engine import cpu_fused, triton_window
from hmrnn_lightning.engine.backend import Backend, run_window
from hmrnn_lightning.engine.plan import InputLayout, LayerWeights, WindowCache, WindowPlan, fast_path_problem
from hmrnn_lightning.engine.pointwise import (
    gate_activations, layer_norm_rows, layer_norm_rows_backward, pointwise_backward, pointwise_forward, rowdot,
)
from hmrnn_lightning.engine.products import (
    affine, gated_addmm_, grad_product, linear, matmul, open_rows, rows_linear,
)
from hmrnn_lightning.states import LayerState

#: Skip rows whose contribution is zero (the module's docstring). None: on CPU only, where the
#: forward skip measured 10% and the two together 16% per stack step (PTB shape, 2 cores).
#: Finding the rows reads ``z`` on the host, which on a GPU would stall the stream.
SKIP_GATED_ROWS: bool | None = None


class SequenceBackend(Backend):
    """The CPU's hand-written window (:mod:`hmrnn_lightning.engine.sequence`)."""

    name = "sequence"

    def __init__(self, fused: bool = True) -> None:
        #: Whether windows may run through the fused CPU kernels; False always runs the PyTorch
        #: loop, the Triton self-check's oracle (the fused kernels share the Triton window's loop,
        #: so a fault in that loop would pass a check against them).
        self.fused = fused

    def why_not(self, stack, device: torch.device | None = None) -> str | None:
        problem = fast_path_problem(stack.cells)
        if problem is not None:
            return problem
        if any(p.requires_grad for p in stack.estimator.parameters()):
            return f"it runs estimators without trainable parameters only, not {type(stack.estimator).__name__}"
        return None

    def window(self, plan: WindowPlan, x: Tensor, state: list[LayerState], boundaries: Tensor | None):
        if self._runs_fused(plan, x):  # the same window, one C call per layer and step
            return triton_window.window(plan, x, state, boundaries, kernels=cpu_fused.kernels())
        return _run(plan, x, state, boundaries, skip_copy=False)

    @torch.no_grad()
    def step(self, plan: WindowPlan, x: Tensor, state: list[LayerState]):
        """The window at ``T = 1``: through the fused kernels where they run (2.3 ms a step
        before, 1.3 ms after at 3 x 128 with layer norm, batch 32, one thread), else with the
        rows in COPY not computed at all."""
        x = x.unsqueeze(1)
        if self._runs_fused(plan, x):
            return triton_window.window(plan, x, state, None, kernels=cpu_fused.kernels())
        return _run(plan, x, state, None, skip_copy=True)

    def _runs_fused(self, plan: WindowPlan, x: Tensor) -> bool:
        return self.fused and cpu_fused.why_not(plan, x) is None


@dataclass
class _Options:
    """A window's per-call settings."""

    plan: WindowPlan
    boundaries: Tensor | None  # [B, T, L - 1] oracle boundaries, or None
    skip_rows: bool  # SKIP_GATED_ROWS as it applies here
    skip_copy: bool  # a generation step: rows in COPY are not computed


def _run(plan: WindowPlan, x: Tensor, state: list[LayerState], boundaries: Tensor | None, skip_copy: bool):
    skip = SKIP_GATED_ROWS if SKIP_GATED_ROWS is not None else x.device.type == "cpu"
    return run_window(_forward, _backward, _Options(plan, boundaries, skip, skip_copy and skip), x, state)


def _forward(opts: "_Options", x_in: Tensor, flat_weights: list[Tensor], flat_state: list[Tensor], keep: bool):
    outs, cache = _Forward(opts.plan, opts, x_in, opts.plan.unflatten_weights(flat_weights), flat_state, keep).run()
    if cache is not None:
        cache.x_in = x_in if opts.plan.layer_norm else None
    return outs, cache


def _backward(opts: "_Options", cache: WindowCache, flat_weights, flat_state, hidden, z_all, grads):
    layers = opts.plan.unflatten_weights(flat_weights)
    return _Backward(opts.plan, opts, cache, layers, flat_state, hidden, z_all, grads).run()


# --- the forward pass ---------------------------------------------------------------------------


def merged_product(s: Tensor, base: Tensor, a: Tensor, w: Tensor, lay: InputLayout, l: int, zp: Tensor, zb: Tensor,
                   skip_closed: bool, mm_dtype) -> None:
    """``s = base + a_t W_merged^T``; with ``skip_closed`` each gated block is multiplied for its
    open rows only (it is 0 on the others). Computed in :func:`linear`'s order and copied into
    ``s``: on 2 cores ``[64, 1024] x [1024, 2049]`` took 2.03 ms so, copy included, against
    2.58 ms as a row-major product into ``s``."""
    if not skip_closed:
        s.copy_(affine(base, a, w, mm_dtype))
        return
    H = lay.above_start[l]  # h^l_{t-1} fills the columns before the gated blocks
    s.copy_(affine(base, a[:, :H], w[:, :H], mm_dtype))
    if l + 1 < len(lay.width):
        gated_addmm_(s, zp, a[:, lay.above_block(l)], w[:, lay.above_block(l)], mm_dtype)
    if lay.with_bottom_up[l]:
        gated_addmm_(s, zb, a[:, lay.below_block(l)], w[:, lay.below_block(l)], mm_dtype)


def add_bottom_up(s: Tensor, w: LayerWeights, x: Tensor, gate: Tensor | None, eps: float, mm_dtype) -> None:
    """``s += gate * N(x W^T)`` for the rows whose gate is open (every row when ``gate`` is None);
    ``N`` the term's layer norm. For inference, where nothing is kept."""
    rows = None if gate is None else open_rows(gate)
    if rows is not None and rows.numel() == 0:
        return
    if rows is not None and rows.numel() == s.shape[0]:
        rows = None
    term = linear(x if rows is None else x.index_select(0, rows), w.bottom_up, mm_dtype)
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


class _Forward:
    """The time loop of one window. ``x_in``: the first layer's input term ``[B, T, 4H + 1]``
    without layer norm, the input ``[B, T, E]`` with it. :meth:`run` returns ``(flat outputs,
    WindowCache or None)``; ``keep`` False is plain inference (one slot per buffer)."""

    def __init__(self, plan: WindowPlan, opts: _Options, x_in: Tensor, layers: list[LayerWeights], flat_state, keep: bool):
        self.plan, self.opts, self.layers, self.keep = plan, opts, layers, keep
        B, T, _ = x_in.shape
        L, mm, new = plan.num_layers, plan.product_dtype, x_in.new_empty
        self.dtype, self.T = x_in.dtype, T
        self.w_merged, self.w_below = plan.product_weights(layers)
        slots = T if keep else 1  # inference keeps one slot, overwritten step by step
        self.S = [new(slots, B, 4 * H + 1) for H in plan.sizes]
        self.A = [new(slots, B, plan.layout.width[l]) for l in range(L)]
        self.C = [new(T, B, H) for H in plan.sizes] if keep else None
        self.act = [new(B, 4 * H) for H in plan.sizes]  # the gates, scratch
        self.hidden = [new(B, T, H) for H in plan.sizes]
        self.z_all = x_in.new_zeros(B, T, L)
        self.logits = x_in.new_full((B, T, L - 1), float("nan"))
        self.e = new(T, max(L - 1, 1), B) if keep else None
        self.graphs: dict = {}
        self.R: list[Tensor | None] = [None] * L
        self.xb = None
        if plan.layer_norm:  # the first layer's input term, one product over the window [T, B, 4H + 1]
            self.R[0] = matmul(x_in.transpose(0, 1).reshape(T * B, -1), self.w_below[0].t(), mm).view(T, B, -1)
            for l in range(1, L):
                self.R[l] = new(slots, B, 4 * plan.sizes[l] + 1)
        else:
            self.xb = (x_in + layers[0].bias).transpose(0, 1)  # [T, B, 4H + 1]: the first layer's base
        self.h, self.c, self.z = list(flat_state[0::3]), list(flat_state[1::3]), list(flat_state[2::3])
        self.ones = torch.ones(B, 1, dtype=self.dtype, device=x_in.device)
        self.untouched: set[int] = set()  # generation: layers that copied on every row

    def run(self):
        L = self.plan.num_layers
        for t in range(self.T):
            zb = self.ones  # z^0_t: the input always "ends a segment"
            for l in range(L):
                if self.opts.skip_copy and l > 0:
                    self._generation_layer(t, l, zb)
                else:
                    self._layer(t, l, zb)
                zb = self.z[l].unsqueeze(-1)
        final = []
        for l in range(L):
            state = (self.h[l], self.c[l], self.z[l])
            # a generation step hands out views of its own buffers (as the hidden outputs are)
            final += state if l in self.untouched or self.opts.skip_copy else [v.clone() for v in state]
        cache = None
        if self.keep:
            cache = WindowCache(s=self.S, inputs=self.A, below=self.R, c=self.C, e=self.e, graphs=self.graphs)
        return (*self.hidden, self.z_all, self.logits, *final), cache

    def _layer(self, t: int, l: int, zb: Tensor, rows: Tensor | None = None) -> None:
        """Layer ``l`` at step ``t``, for every row or (inference) only for ``rows``."""
        plan, opts, w = self.plan, self.opts, self.layers[l]
        lay, mm, H = plan.layout, plan.product_dtype, plan.sizes[l]
        slot = t if self.keep else 0
        n = zb.shape[0] if rows is None else rows.numel()

        def pick(v: Tensor) -> Tensor:
            return v if rows is None else v.index_select(0, rows)

        h_prev, c_prev, z_prev, zb = pick(self.h[l]), pick(self.c[l]), pick(self.z[l]), pick(zb)
        zp = z_prev.unsqueeze(-1)
        a, s = self.A[l][slot][:n], self.S[l][slot][:n]
        a[:, :H] = h_prev
        if l + 1 < plan.num_layers:
            torch.mul(pick(self.h[l + 1]), zp, out=a[:, lay.above_block(l)])  # layer l+1 is still at t-1
        if lay.with_bottom_up[l]:
            torch.mul(pick(self.h[l - 1]), zb, out=a[:, lay.below_block(l)])
        base = self.xb[t] if self.xb is not None and l == 0 else w.bias
        merged_product(s, base, a, self.w_merged[l], lay, l, zp, zb, opts.skip_rows, mm)
        if plan.layer_norm:
            if l == 0:
                _bottom_up_term(s, self.R[0][t], w, None, plan.below_eps[0])
            elif self.keep or not opts.skip_rows:  # training needs every row (the module's docstring)
                raw = self.R[l][slot].copy_(linear(self.h[l - 1], self.w_below[l], mm))
                _bottom_up_term(s, raw, w, zb, plan.below_eps[l])
            else:
                add_bottom_up(s, w, pick(self.h[l - 1]), zb, plan.below_eps[l], mm)
        ops = select_operations(zb.squeeze(-1), z_prev)
        c_new = self.C[l][t] if self.keep else torch.empty_like(c_prev)
        h_new = self.hidden[l][:, t] if rows is None else torch.empty_like(h_prev)
        pointwise_forward(s, c_prev, h_prev, ops.update, ops.copy, zp, self.act[l][:n], c_new, h_new, self._cell_norm(l))
        if l + 1 < plan.num_layers:
            logit = s[:, 4 * H]
            z_new = carry_boundary(ops.copy.squeeze(-1), z_prev, self._estimate(t, l, logit))
        else:
            logit, z_new = None, torch.full_like(z_prev, TOP_LAYER_Z)
        if rows is not None:  # back into the whole batch
            h_new = self.hidden[l][:, t].copy_(self.h[l].index_copy(0, rows, h_new))
            c_new, z_new = self.c[l].index_copy(0, rows, c_new), self.z[l].index_copy(0, rows, z_new)
        if logit is not None:
            self.logits[:, t, l] = logit if rows is None else self.logits[:, t, l].index_copy(0, rows, logit)
        self.z_all[:, t, l] = z_new
        self.h[l], self.c[l], self.z[l] = h_new, c_new, z_new

    def _cell_norm(self, l: int):
        w = self.layers[l]
        return (w.cell_gamma, w.cell_beta, self.plan.cell_eps[l]) if self.plan.layer_norm else None

    def _estimate(self, t: int, l: int, logit: Tensor) -> Tensor:
        """The estimator's decision ``e`` (or the given boundary); in training it also keeps the
        decision and the estimator's own graph for the backward pass."""
        if self.opts.boundaries is not None:
            e = self.opts.boundaries[:, t, l].to(self.dtype)
        elif self.keep:
            with torch.enable_grad():
                # a copy: the logit lives in S, which later steps overwrite in place, and an
                # estimator may keep its input for its backward (clamp does)
                leaf = logit.detach().clone().requires_grad_()
                e_graph = self.plan.estimator(leaf)
            e = e_graph.detach().to(self.dtype)
            if e_graph.requires_grad:
                self.graphs[(t, l)] = (leaf, e_graph)
        else:
            e = self.plan.estimator(logit).to(self.dtype)
        if self.keep:
            self.e[t, l] = e
        return e

    def _generation_layer(self, t: int, l: int, zb: Tensor) -> None:
        """Layer ``l`` of a generation step: the rows in COPY keep ``h``, ``c``, ``z`` and compute
        nothing (their logit stays NaN); the others run through :meth:`_layer`."""
        copy = select_operations(zb.squeeze(-1), self.z[l]).copy.squeeze(-1)
        rows = (copy != 1).nonzero().squeeze(-1)
        if rows.numel() > 0:
            return self._layer(t, l, zb, None if rows.numel() == zb.shape[0] else rows)
        self.hidden[l][:, t] = self.h[l]  # the whole layer copies; z stays (it is 0 in COPY)
        self.z_all[:, t, l] = self.z[l]
        self.untouched.add(l)  # its state goes out as the very tensors that came in


# --- the backward pass --------------------------------------------------------------------------


def _zero_if_none(g: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if g is None else g


def _bottom_up_backward(ds: Tensor, raw: Tensor, w: LayerWeights, gate: Tensor | None, eps: float):
    """The backward of :func:`_bottom_up_term`: ``(d raw, d gate or None, d gamma, d beta)``;
    ``d gate = <LN(raw), ds>``."""
    term, mean, rstd = layer_norm_rows(raw, w.below_gamma, w.below_beta, eps)
    d_raw, d_gamma, d_beta = layer_norm_rows_backward(
        ds if gate is None else ds * gate, raw, mean, rstd, w.below_gamma, w.below_beta
    )
    return d_raw, None if gate is None else rowdot(term, ds), d_gamma, d_beta


class _Backward:
    """The backward time loop over a :class:`WindowCache`; :meth:`run` returns the gradients of
    ``x_in``, the flat weights and the initial state."""

    def __init__(self, plan: WindowPlan, opts: _Options, cache: WindowCache, layers, flat_state, hidden, z_all, grads):
        L = plan.num_layers
        B, T, _ = z_all.shape
        self.plan, self.opts, self.cache, self.layers, self.hidden, self.z_all = plan, opts, cache, layers, hidden, z_all
        self.T, self.B = T, B
        merged, below = plan.product_weights(layers)
        # [in, out] layouts: the inputs' gradients d @ W = linear(d, W^T), in the faster order
        self.w_merged_t = [w.t().contiguous() for w in merged]
        self.w_below_t = [w.t().contiguous() for w in below] if plan.layer_norm else None
        self.g_hidden = [_zero_if_none(grads[l], hidden[l]) for l in range(L)]
        self.g_z, self.g_logits = _zero_if_none(grads[L], z_all), grads[L + 1]
        g_final = grads[L + 2 :]
        self.h0, self.c0, self.z0 = flat_state[0::3], flat_state[1::3], flat_state[2::3]
        # gradients arriving at (h, c, z) of each layer from the step after (or the final state)
        self.dh_next = [_zero_if_none(g_final[3 * l], self.h0[l]) for l in range(L)]
        self.dc_next = [_zero_if_none(g_final[3 * l + 1], self.c0[l]) for l in range(L)]
        self.dz_next = [_zero_if_none(g_final[3 * l + 2], self.z0[l]).unsqueeze(-1) for l in range(L)]
        self.dz_next[L - 1] = torch.zeros_like(self.dz_next[L - 1])  # the top layer's z is the constant TOP_LAYER_Z
        self.d_norms = [{k: torch.zeros_like(getattr(w, k)) for k in ("below_gamma", "below_beta", "cell_gamma", "cell_beta")}
                        if plan.layer_norm else None for w in layers]
        self.act = [z_all.new_empty(B, 4 * H) for H in plan.sizes]
        self.live = [torch.ones(T, B, dtype=torch.bool, device=z_all.device) for _ in range(L)]  # ds row not 0
        self.ones = z_all.new_ones(B)

    def run(self):
        for t in range(self.T - 1, -1, -1):
            from_above = (None, None)  # d h^l_t, d z^l_t through layer l+1's bottom-up term
            for l in range(self.plan.num_layers - 1, -1, -1):
                from_above = self._layer(t, l, *from_above)
        return self._gradients()

    def _layer(self, t: int, l: int, dh_from_above: Tensor | None, dz_from_above: Tensor | None):
        """Layer ``l`` at step ``t`` backwards; returns what it sends to layer ``l - 1`` at ``t``."""
        plan, cache, w = self.plan, self.cache, self.layers[l]
        H, top, lay = plan.sizes[l], l + 1 == plan.num_layers, plan.layout
        h_prev = self.hidden[l][:, t - 1] if t > 0 else self.h0[l]
        c_prev = cache.c[l][t - 1] if t > 0 else self.c0[l]
        ops = select_operations(self.z_all[:, t, l - 1] if l > 0 else self.ones,
                                self.z_all[:, t - 1, l] if t > 0 else self.z0[l])
        u, k, zp = ops.update, ops.copy, ops.flush
        zb = self.z_all[:, t, l - 1 : l] if l > 0 else None
        # d h^l_t: from the loss; layer l at t+1 (recurrent term, COPY) and layer l-1 at t+1
        # (top-down term), both in dh_next; layer l+1 at t (its bottom-up term)
        dh = self.g_hidden[l][:, t] + self.dh_next[l]
        if dh_from_above is not None:
            dh = dh + dh_from_above
        ds = cache.s[l][t]  # still s here: pointwise_backward overwrites it with ds
        gate_activations(ds, self.act[l])  # the gates, from s
        cell_norm = (w.cell_gamma, w.cell_beta, plan.cell_eps[l]) if plan.layer_norm else None
        self.dc_next[l], dh_prev, du, dk, dzp, d_norm = pointwise_backward(
            self.act[l], cache.c[l][t], c_prev, h_prev, u, k, zp, dh, self.dc_next[l], ds, cell_norm)
        if d_norm is not None:
            self.d_norms[l]["cell_gamma"] += d_norm[0]
            self.d_norms[l]["cell_beta"] += d_norm[1]
        carry = None  # z^l_{t-1}'s gradient through COPY's carry alone (the top layer has no carry)
        if not top:
            dzp, dk, carry = self._boundary_backward(t, l, ds, k, zp, dzp, dk, dz_from_above)
        else:
            ds[:, 4 * H] = 0.0
        # u = (1 - z_prev) z_below, k = (1 - z_prev)(1 - z_below)
        dzb = None
        if l > 0:
            dzp = dzp - zb * du - (1.0 - zb) * dk
            dzb = (1.0 - zp) * (du - dk)
        else:
            dzp = dzp - du
        if not plan.flush_gradient:  # z^l_{t-1} is a constant in the operations' weights
            dzp = carry if carry is not None else torch.zeros_like(dzp)
        # rows in COPY have ds = 0 exactly (every gate term carries a factor u, u + z_prev or
        # 1 - k), so unless something outside gave their logit a gradient they are left out
        rows = None
        if self.opts.skip_rows and l > 0:
            self.live[l][t] = (k.squeeze(-1) != 1) | (ds[:, 4 * H] != 0)
            rows = self.live[l][t].nonzero().squeeze(-1)
        da = rows_linear(ds, self.w_merged_t[l], rows, plan.product_dtype)  # ds W_merged: the inputs' gradients, ungated
        dh_prev = dh_prev + da[:, :H]
        if not top:  # the top-down term read h^{l+1}_{t-1}, gated by z^l_{t-1}
            cols = lay.above_block(l)
            h_above = self.hidden[l + 1][:, t - 1] if t > 0 else self.h0[l + 1]
            self.dh_next[l + 1] = self.dh_next[l + 1] + zp * da[:, cols]  # layer l+1 at step t is done
            dzp = dzp + rowdot(h_above, da[:, cols])
        self.dh_next[l], self.dz_next[l] = dh_prev, dzp
        return self._bottom_up_gradients(t, l, ds, da, zb, dzb, rows)

    def _boundary_backward(self, t, l, ds, k, zp, dzp, dk, dz_from_above):
        """The gradient reaching ``z^l_t`` through COPY's carry and the estimator: into ``dzp``,
        ``dk`` and the logit's column of ``ds``; returns ``(dzp, dk, the carry's part of dzp)``."""
        dz = self.g_z[:, t, l : l + 1] + self.dz_next[l]
        if dz_from_above is not None:
            dz = dz + dz_from_above
        e = self.cache.e[t, l].unsqueeze(-1)
        carry = k * dz
        dzp, dk = dzp + carry, dk + (zp - e) * dz
        d_logit = None
        graph = self.cache.graphs.get((t, l))
        if graph is not None:
            leaf, e_graph = graph
            (d_logit,) = torch.autograd.grad(e_graph, leaf, ((1.0 - k) * dz).squeeze(-1).to(e_graph.dtype))
        if self.g_logits is not None:
            d_logit = self.g_logits[:, t, l] if d_logit is None else d_logit + self.g_logits[:, t, l]
        ds[:, 4 * self.plan.sizes[l]] = 0.0 if d_logit is None else d_logit
        return dzp, dk, carry

    def _bottom_up_gradients(self, t, l, ds, da, zb, dzb, rows):
        """``(d h^{l-1}_t, d z^{l-1}_t)`` through the bottom-up term, gated by ``z^{l-1}_t``: in the
        merged product without layer norm, normalised on its own with it."""
        plan, lay = self.plan, self.plan.layout
        if lay.with_bottom_up[l]:
            cols = lay.below_block(l)
            return zb * da[:, cols], dzb + rowdot(self.hidden[l - 1][:, t], da[:, cols])
        if not plan.layer_norm:
            return None, None
        raw = self.cache.below[l][t]
        d_raw, d_gate, d_gamma, d_beta = _bottom_up_backward(ds, raw, self.layers[l], zb, plan.below_eps[l])
        self.d_norms[l]["below_gamma"] += d_gamma
        self.d_norms[l]["below_beta"] += d_beta
        raw.copy_(d_raw)  # the product's gradient, for the weight gradient
        if l == 0:
            return None, None
        if rows is not None:
            rows = rows[zb.squeeze(-1).index_select(0, rows) != 0]
        return rows_linear(d_raw, self.w_below_t[l], rows, plan.product_dtype), dzb + d_gate

    def _gradients(self):
        """Weight gradients (one product per weight over the window), ``d x_in``, ``d state``."""
        plan, cache, T, B, mm = self.plan, self.cache, self.T, self.B, self.plan.product_dtype
        flat = []
        for l, w in enumerate(self.layers):
            dS = cache.s[l].view(T * B, -1)
            d = w.split_merged(self._merged_weight_grad(dS, l), plan.layout.with_bottom_up[l])
            d["bias"] = dS.sum(0)
            if plan.layer_norm:
                below_in = (cache.x_in if l == 0 else self.hidden[l - 1]).transpose(0, 1).reshape(T * B, -1)
                mask = None
                if self.opts.skip_rows and l > 0:
                    mask = self.live[l].flatten() & (self.z_all[:, :, l - 1].t().flatten() != 0)
                d["bottom_up"] = grad_product(cache.below[l].view(T * B, -1), below_in, mask, mm)
                d.update(self.d_norms[l])
            for name in plan.names[l]:
                g = d.get(name)  # the first layer's W without LN: autograd's, through x_in
                flat.append(None if g is None else g.to(getattr(w, name).dtype))
        if plan.layer_norm:  # the gradient of the input, through the first layer's input term
            dx = matmul(cache.below[0].view(T * B, -1), self.layers[0].bottom_up, mm).view(T, B, -1).transpose(0, 1)
        else:  # the gradient of x_in = W x + b
            dx = cache.s[0].transpose(0, 1)
        d_state = [g for l in range(plan.num_layers) for g in (self.dh_next[l], self.dc_next[l], self.dz_next[l].squeeze(-1))]
        return (dx, *flat, *d_state)

    def _merged_weight_grad(self, dS: Tensor, l: int) -> Tensor:
        """``dW_merged = sum_t ds_t^T a_t``, one product over the window; on CPU without the rows
        whose ``ds`` is 0, and per gated block without its closed rows."""
        lay, mm, T, B = self.plan.layout, self.plan.product_dtype, self.T, self.B
        a_all = self.cache.inputs[l].view(T * B, -1)
        if not self.opts.skip_rows:
            return grad_product(dS, a_all, None, mm)
        H, live = lay.above_start[l], self.live[l].flatten()  # the columns of h^l_{t-1}
        parts = [grad_product(dS, a_all[:, :H], live, mm)]
        if l + 1 < len(lay.width):  # gated by z^l_{t-1}
            gate = torch.cat([self.z0[l].unsqueeze(0), self.z_all[:, : T - 1, l].t()]).flatten()
            parts.append(grad_product(dS, a_all[:, lay.above_block(l)], live & (gate != 0), mm))
        if lay.with_bottom_up[l]:  # gated by z^{l-1}_t
            gate = self.z_all[:, :, l - 1].t().flatten()
            parts.append(grad_product(dS, a_all[:, lay.below_block(l)], live & (gate != 0), mm))
        return torch.cat(parts, dim=1)
