"""The pointwise part of the HM-LSTM step in PyTorch, forward and backward (the CPU backend's;
the Triton kernels compute the same per row). Per row, with ``s`` the ``4H + 1`` pre-activation,
``z_prev = z^l_{t-1}`` and ``z_below = z^{l-1}_t``::

    f, i, o = sigm(s[:H]), sigm(s[H:2H]), sigm(s[2H:3H]);  g = tanh(s[3H:4H])
    u = (1 - z_prev) z_below        k = (1 - z_prev)(1 - z_below)      (FLUSH's weight is z_prev)
    c = (u f + k) c_prev + (u + z_prev) i g                            (eq. 2, regrouped)
    h = k h_prev + (1 - k) o tanh(N(c))                                (eq. 3; N: the cell's layer norm or identity)

``z`` (COPY keeps it) is :func:`~hmrnn_lightning.cells.operations.carry_boundary`, the caller's.
:func:`pointwise_forward` and :func:`pointwise_backward` are self-contained (tensors in, tensors
out or written in place) so that a fused implementation can replace them one for one.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: ``(gamma, beta, eps)`` of a layer norm over the last axis.
Norm = tuple[Tensor, Tensor, float]


def gate_activations(s: Tensor, act: Tensor) -> None:
    """``f, i, o = sigm(s)``, ``g = tanh(s)`` into ``act`` ``[B, 4H]``."""
    H = act.shape[-1] // 4
    torch.sigmoid(s[:, : 3 * H], out=act[:, : 3 * H])
    torch.tanh(s[:, 3 * H : 4 * H], out=act[:, 3 * H :])


def layer_norm_rows(x: Tensor, gamma: Tensor, beta: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(LN(x), mean, 1/std)`` from the kernel ``nn.LayerNorm`` runs, so values match it bit for bit."""
    return torch.native_layer_norm(x, (x.shape[-1],), gamma, beta, eps)


def layer_norm_rows_backward(dy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, gamma: Tensor, beta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dgamma, dbeta)`` of :func:`layer_norm_rows` (PyTorch's own backward kernel)."""
    return torch.ops.aten.native_layer_norm_backward(dy, x, (x.shape[-1],), mean, rstd, gamma, beta, [True, True, True])


def pointwise_forward(
    s: Tensor, c_prev: Tensor, h_prev: Tensor, u: Tensor, k: Tensor, zp: Tensor, act: Tensor, c_out: Tensor,
    h_out: Tensor, cell_norm: Norm | None = None,
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


def pointwise_backward(
    act: Tensor, c_t: Tensor, c_prev: Tensor, h_prev: Tensor, u: Tensor, k: Tensor, zp: Tensor, dh: Tensor,
    dc: Tensor, ds: Tensor, cell_norm: Norm | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, tuple[Tensor, Tensor] | None]:
    """The chain rule of :func:`pointwise_forward` (``act`` holds the gates of ``s``, ``c_t`` the
    step's cell, ``dh`` and ``dc`` the gradients reaching ``h_t`` and ``c_t``): writes ``d s[:, :4H]`` into ``ds`` and returns
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
