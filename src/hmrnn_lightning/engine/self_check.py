"""The Triton backend's self-check on first use.

The kernels are compiled by whatever Triton the machine has, for whatever GPU it has; the tests
run them only under Triton's interpreter. So the first time the Triton backend runs on a device
(per device, state dtype, product dtype and layout), :func:`triton_problem` runs a tiny window
(2 rows, 3 steps, the stack's own weights, given boundaries) through it and through the sequence
backend's PyTorch loop (not its fused CPU kernels, which share the Triton loop) and compares outputs and gradients. On a compile error or a mismatch it warns once,
naming the reason, and the stack runs the sequence backend there for the rest of the process.
The given boundaries keep the comparison free of threshold flips; the estimator's own rule is
the one part of the kernels it leaves out. Its cost is one compilation of the kernels (which
the first window pays anyway) and two windows of three steps.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from hmrnn_lightning.engine.backend import Backend
from hmrnn_lightning.engine.plan import WindowPlan, flatten_states
from hmrnn_lightning.states import LayerState

#: ``(device, state dtype, product dtype, layer norm, sizes) -> None (passed) or the reason``, per process.
RESULTS: dict[tuple, str | None] = {}


def _tolerance(plan: WindowPlan, dtype: torch.dtype) -> float:
    """Relative norm-wise tolerance: summation order (and TF32) at 32 bits; 16-bit products
    round their inputs alike on both sides, so a loose bound still catches any real error."""
    if dtype == torch.float64 and plan.product_dtype is None:
        return 1e-8
    return 5e-2 if plan.product_dtype in (torch.float16, torch.bfloat16) else 1e-2


def _run(backend: Backend, plan: WindowPlan, x: Tensor, state: list[LayerState], boundaries: Tensor, probe: list[Tensor]):
    """Outputs and gradients (of ``x``, the state and the trainable weights) of one window."""
    with torch.enable_grad():
        x = x.detach().requires_grad_()
        state = [LayerState(*(t.detach().requires_grad_() for t in s)) for s in state]
        hidden, z_all, logits, final = backend.window(plan, x, state, boundaries)
        outs = [*hidden, logits, *flatten_states(final)]
        loss = sum((o * p).sum() for o, p in zip(hidden, probe)) + logits.sum() + sum(t.sum() for t in flatten_states(final))
        inputs = [x, *flatten_states(state), *(w for w in plan.flat_weights() if w.requires_grad)]
        grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return [o.detach() for o in outs] + [z_all.detach()] + [g for g in grads if g is not None]


def _mismatch(a: list[Tensor], b: list[Tensor], tol: float) -> str | None:
    if len(a) != len(b):
        return f"it returned {len(a)} outputs and gradients, the sequence path {len(b)}"
    for i, (u, v) in enumerate(zip(a, b)):
        error = (u.double() - v.double()).norm() / (v.double().norm() + 1e-6)
        if not bool(torch.isfinite(error)) or error > tol:
            return f"output or gradient {i} differs from the sequence path's by {float(error):.2g} (relative; allowed {tol:g})"
    return None


def failed_on(device: torch.device, layer_norm: bool, sizes: tuple[int, ...]) -> str | None:
    """The reason of a failed check on ``device`` (without an index: any of its kind) for this
    layout, in any dtype; None when none failed. What :meth:`HMStack.active_impl` reports by."""
    for (where, _, _, ln, shape), reason in RESULTS.items():
        checked = torch.device(where)
        if reason is not None and (ln, shape) == (layer_norm, sizes) and checked.type == device.type and (
                device.index is None or checked.index == device.index):
            return reason
    return None


def triton_problem(triton: Backend, sequence: Backend, plan: WindowPlan, x: Tensor) -> str | None:
    """None when the Triton backend agrees with the sequence backend for ``x``'s device, dtype
    and ``plan``'s layout (checked once per process); else the reason, warned once."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    key = (str(x.device), dtype, plan.product_dtype, plan.layer_norm, tuple(plan.sizes))
    if key in RESULTS:
        return RESULTS[key]
    gen = torch.Generator(device=x.device).manual_seed(0)  # leaves the global random stream alone
    B, T, L = 2, 3, plan.num_layers

    def rand(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, device=x.device, dtype=dtype)

    xs = rand(B, T, x.shape[-1])
    state = [LayerState(rand(B, H), rand(B, H), (rand(B) > 0).to(dtype)) for H in plan.sizes]
    boundaries = (rand(B, T, max(L - 1, 0)) > 0).to(dtype)
    probe = [rand(B, T, H) for H in plan.sizes]
    try:
        got = _run(triton, plan, xs, state, boundaries, probe)
    except Exception as error:  # noqa: BLE001 - any failure of the kernels is the reason to fall back
        reason = f"the kernels failed to run: {type(error).__name__}: {str(error)[:300]}"
    else:
        reason = _mismatch(got, _run(sequence, plan, xs, state, boundaries, probe), _tolerance(plan, dtype))
    RESULTS[key] = reason
    if reason is not None:
        warnings.warn(f"HMStack: the Triton path failed its self-check on {x.device} ({dtype}, products in "
                      f"{plan.product_dtype or dtype}): {reason}; running the sequence path there instead", stacklevel=4)
    return reason
