"""The interface every fast path implements, and the one check of what they can run.

A backend runs a whole window of an HM-LSTM stack from a :class:`~hmrnn_lightning.engine.plan.WindowPlan`
and returns ``(hidden per layer [B, T, H], boundaries [B, T, L], logits [B, T, L - 1], final
state)``; the stack turns that into a :class:`~hmrnn_lightning.states.StackOutput`. Backends
never see the stack, except :meth:`Backend.why_not`, which says whether they can run it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from hmrnn_lightning.engine.plan import layout_problem
from hmrnn_lightning.states import LayerState


def fast_path_problem(stack) -> str | None:
    """Why no fast path can run ``stack``'s cells (the first cell's
    :func:`~hmrnn_lightning.engine.plan.layout_problem`), or None."""
    for cell in stack.cells:
        problem = layout_problem(cell)
        if problem is not None:
            return problem
    return None


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

    def forget(self) -> None:
        """Drop whatever the backend keeps between calls (nothing, unless it captures)."""
