"""One step of an HM-LSTM stack for generation, doing only the work the step needs.

Sampling feeds one symbol at a time, so nothing can be batched over time; what can be
saved is the work that the UPDATE / COPY / FLUSH rule (:mod:`hmrnn_lightning.cells.operations`)
makes unnecessary:

* a row (sequence of the batch) whose layer is in COPY keeps ``h``, ``c`` and ``z`` as they
  are, so the layer computes nothing for it; upper layers copy most of the time once a
  model has learnt its boundaries, so this is most of their work;
* the top-down term only for rows with ``z^l_{t-1} = 1`` and the bottom-up term only for
  rows with ``z^{l-1}_t = 1`` (their gate is 0 elsewhere);
* the recurrent and top-down weights are prepared once (detached; without layer norm the
  first layer's input and recurrent weights side by side, ``[W_x, U_1]``, for one product) and
  kept until a parameter changes.

Per layer: the recurrent product (with the input's, as above), the gated top-down product,
and the gated bottom-up term through :func:`~hmrnn_lightning.cells.sequence.add_bottom_up`,
which the sequence path's inference uses too (and which normalises the term where the layer
has layer norm).

The values are the reference loop's up to summation order. One difference is visible:
the boundary logit of a row in COPY is not computed, and :meth:`HMStack.step` reports it
as NaN. Stochastic estimators draw only for the rows they decide, so their random
stream differs from the reference loop's (the distribution is the same).
"""

from __future__ import annotations

import torch
from torch import Tensor

from hmrnn_lightning.cells.base import LayerState
from hmrnn_lightning.cells.operations import select_operations
from hmrnn_lightning.cells.hm_lstm_kernel import TOP_LAYER_Z, LayerWeights, carry_boundary, matmul_dtype, pointwise_forward
from hmrnn_lightning.cells.sequence import add_bottom_up, affine, gated_addmm_


def _prepared_weights(stack) -> list[list[Tensor | None]]:
    """Per layer ``[first, U_{l+1} or None]`` in ``[out, in]`` layout, detached: ``first`` is
    ``[W_x, U_1]`` side by side for a first layer without layer norm (one product for its input
    and recurrent terms), else ``U_l``. Rebuilt when a parameter is replaced or updated in place
    (its version counter moves)."""
    params = [cell.recurrent.weight for cell in stack.cells] + [stack.cells[0].bottom_up.weight]
    params += [cell.top_down.weight for cell in stack.cells if cell.top_down is not None]
    key = tuple((p.data_ptr(), p._version, p.device, p.dtype) for p in params)
    cached = getattr(stack, "_generation_cache", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    prepared = []
    for l, cell in enumerate(stack.cells):
        recurrent = cell.recurrent.weight.detach()
        merge_input = l == 0 and not cell.layer_norm
        prepared.append([
            torch.cat([cell.bottom_up.weight.detach(), recurrent], dim=1) if merge_input else recurrent,
            cell.top_down.weight.detach() if cell.top_down is not None else None,
        ])
    stack._generation_cache = (key, prepared)
    return prepared


def _pick(t: Tensor, rows: Tensor | None) -> Tensor:
    return t if rows is None else t.index_select(0, rows)


@torch.no_grad()
def generation_step(stack, x: Tensor, state: list[LayerState]):
    """``x`` ``[batch, input_size]`` -> ``(h per layer, z [batch, layers], logits [batch, layers - 1], state)``."""
    mm_dtype = matmul_dtype(x)
    dtype = stack.state_dtype(x)
    x = x.to(dtype)
    cells = stack.cells
    weights = _prepared_weights(stack)
    layers = [LayerWeights.from_cell(cell) for cell in cells]
    L = len(cells)
    B = x.shape[0]
    zs = x.new_zeros(B, L, dtype=dtype)
    logits = x.new_full((B, max(L - 1, 0)), float("nan"), dtype=dtype)
    new_state: list[LayerState] = []
    zb = torch.ones(B, 1, dtype=dtype, device=x.device)
    for l, cell in enumerate(cells):
        prev = state[l]
        ops = select_operations(zb.squeeze(-1), prev.z)
        u, k, zp = ops.update, ops.copy, ops.flush
        rows = (k.squeeze(-1) != 1).nonzero().squeeze(-1) if l > 0 else None  # not in COPY
        if rows is not None and rows.numel() == 0:
            new_state.append(prev)  # the whole layer copies; z stays (it is 0 in COPY)
            zs[:, l] = prev.z
            zb = prev.z.unsqueeze(-1)
            continue
        part = rows is not None and rows.numel() < B
        if not part:
            rows = None
        h_prev, c_prev, zp_r, zb_r, u_r, k_r = (_pick(t, rows) for t in (prev.h, prev.c, zp, zb, u, k))
        h_above = _pick(state[l + 1].h, rows) if l + 1 < L else None
        h_below = x if l == 0 else _pick(new_state[l - 1].h, rows)
        w_first, w_above = weights[l]
        merged_input = l == 0 and not cell.layer_norm
        s = affine(cell.bias, torch.cat([x, h_prev], dim=1) if merged_input else h_prev, w_first, mm_dtype)
        if w_above is not None:
            gated_addmm_(s, zp_r, zp_r * h_above, w_above, mm_dtype)
        if not merged_input:
            eps = cell.norm_cell.eps if cell.layer_norm else 0.0
            add_bottom_up(s, layers[l], h_below, zb_r if l > 0 else None, eps, mm_dtype)
        H = cell.hidden_size
        act, c_new, h_new = s.new_empty(s.shape[0], 4 * H), torch.empty_like(c_prev), torch.empty_like(h_prev)
        norm = cell.norm_cell
        pointwise_forward(s, c_prev, h_prev, u_r, k_r, zp_r, act, c_new, h_new, (norm.weight, norm.bias, norm.eps) if cell.layer_norm else None)
        if l + 1 < L:
            logit = s[:, 4 * H]
            k1 = k_r.squeeze(-1)
            z_new = carry_boundary(k1, zp_r.squeeze(-1), stack.estimator(logit).to(dtype))
        else:
            z_new = torch.full_like(zp_r.squeeze(-1), TOP_LAYER_Z)
        if part:
            h_new = prev.h.index_copy(0, rows, h_new)
            c_new = prev.c.index_copy(0, rows, c_new)
            z_new = prev.z.index_copy(0, rows, z_new) if l + 1 < L else torch.full_like(prev.z, TOP_LAYER_Z)
            if l + 1 < L:
                logits[:, l].index_copy_(0, rows, logit)
        elif l + 1 < L:
            logits[:, l] = logit
        new_state.append(LayerState(h_new, c_new, z_new))
        zs[:, l] = z_new
        zb = z_new.unsqueeze(-1)
    return [s.h for s in new_state], zs, logits, new_state

