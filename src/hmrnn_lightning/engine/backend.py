"""The interface every fast path implements, and the one check of what they can run.

A backend runs a whole window of an HM-LSTM stack from a :class:`~hmrnn_lightning.engine.plan.WindowPlan`
and returns ``(hidden per layer [B, T, H], boundaries [B, T, L], logits [B, T, L - 1], final
state)``; the stack turns that into a :class:`~hmrnn_lightning.states.StackOutput`. Backends
never see the stack, except :meth:`Backend.why_not`, which says whether they can run it.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from hmrnn_lightning.engine.plan import flatten_states, window_outputs
from hmrnn_lightning.states import LayerState


class Backend:
    """A way to run windows. Subclasses set :attr:`name` and implement :meth:`why_not` and
    :meth:`window`; :meth:`step` is the window at ``T = 1`` unless they do better."""

    name: str = ""

    def why_not(self, stack, device: torch.device | None = None) -> str | None:
        """None when this backend can run ``stack`` on ``device`` (None: wherever it may be moved);
        else the reason, as a clause (``"it runs ..."``)."""
        raise NotImplementedError  # pragma: no cover

    def window(self, plan, x: Tensor, state: list[LayerState], boundaries: Tensor | None):
        """Run ``x`` ``[B, T, E]`` from ``state``; ``boundaries`` ``[B, T, L - 1]`` replace the
        estimator's decisions where given."""
        raise NotImplementedError  # pragma: no cover

    def step(self, plan, x: Tensor, state: list[LayerState]):
        """One step without gradients, ``x`` ``[B, E]``; outputs with a time axis of 1."""
        with torch.no_grad():
            return self.window(plan, x.unsqueeze(1), state, None)


def run_window(forward, backward, settings, x: Tensor, state: list[LayerState]):
    """A backend's window as one autograd function (or plain inference without gradients).

    Args:
        forward: ``(settings, x_in, flat_weights, flat_state, keep) -> (flat outputs, WindowCache
            or None)``; ``x_in`` is the plan's :meth:`~hmrnn_lightning.engine.plan.WindowPlan.first_layer_input`.
        backward: ``(settings, cache, flat_weights, flat_state, hidden, z_all, grads) -> gradients
            of (x_in, *flat_weights, *flat_state)``.
        settings: the backend's per-call settings; ``settings.plan`` is the window's plan.
    """
    plan = settings.plan
    x_in = plan.first_layer_input(x, torch.float64 if x.dtype == torch.float64 else torch.float32)
    flat_weights, flat_state = plan.flat_weights(), [t.contiguous() for t in flatten_states(state)]
    tensors = [x_in, *flat_weights, *flat_state]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        outs = _WindowFunction.apply((forward, backward), settings, *tensors)
    else:
        with torch.no_grad(), torch.autocast(x_in.device.type, enabled=False):  # the products cast themselves
            outs, _ = forward(settings, x_in, flat_weights, flat_state, False)
    return window_outputs(outs, plan.num_layers)


class _WindowFunction(torch.autograd.Function):
    """Inputs: the backend's ``(forward, backward)``, its settings, ``x_in``, the plan's flat
    weights, ``(h, c, z)`` per layer. Outputs: L hidden sequences, boundaries, logits, ``(h, c, z)``
    per layer."""

    @staticmethod
    def forward(ctx, functions, settings, x_in: Tensor, *rest: Tensor):  # type: ignore[override]
        L, n = settings.plan.num_layers, len(settings.plan.flat_weights())
        with torch.autocast(x_in.device.type, enabled=False):
            outs, cache = functions[0](settings, x_in, list(rest[:n]), list(rest[n:]), True)
        ctx.functions, ctx.settings, ctx.cache, ctx.num_weights = functions, settings, cache, n
        # x_in itself is not kept: without layer norm it is [B, T, 4H + 1] and the backward does
        # not read it (keeping it raised the Text8 shape's peak from 4,025 to 4,305 MB)
        ctx.save_for_backward(*rest, *outs[: L + 1])
        return outs

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: Tensor):  # type: ignore[override]
        n, L = ctx.num_weights, ctx.settings.plan.num_layers
        saved = ctx.saved_tensors
        flat_weights, flat_state = list(saved[:n]), list(saved[n : n + 3 * L])
        hidden, z_all = saved[n + 3 * L : n + 4 * L], saved[n + 4 * L]
        with torch.autocast(z_all.device.type, enabled=False):
            out = ctx.functions[1](ctx.settings, ctx.cache, flat_weights, flat_state, hidden, z_all, grads)
        ctx.cache = None  # free the stored activations now, not when the graph goes
        return (None, None, *out)
