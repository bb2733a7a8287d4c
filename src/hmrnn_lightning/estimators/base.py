"""What every boundary estimator shares: the hard sigmoid and its slope.

A boundary estimator turns the boundary pre-activation ``z~`` of a layer into the
boundary state ``z`` (eqs. 8-9 of the paper) and decides how gradients flow back
through that decision (section 3.3).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hmrnn_lightning.states import StackOutput


def hard_sigmoid(x: Tensor, slope: Tensor | float) -> Tensor:
    """``max(0, min(1, (a x + 1) / 2))``, the paper's ``hard sigm`` with slope ``a``."""
    return torch.clamp((slope * x + 1.0) * 0.5, 0.0, 1.0)


class BoundaryEstimator(nn.Module):
    """Base class: maps boundary logits to boundary states.

    The slope ``a`` of the hard sigmoid is a buffer, so it is saved in checkpoints and
    moves with the module between devices; slope annealing sets it from outside with
    :meth:`set_slope`.

    Subclasses implement :meth:`forward` and may add a loss term with
    :meth:`auxiliary_loss` (REINFORCE does).

    Args:
        slope: initial slope ``a`` of the hard sigmoid; must be positive.
    """

    #: True when ``forward`` returns exactly 0/1; soft estimators return values in [0, 1].
    discrete: bool = True

    #: The rule of the GPU kernels this estimator's forward is (``"step"``, ``"bernoulli"`` or
    #: ``"soft"``), or None: then the fast paths run the module itself (the CPU's) or do not run
    #: it (the GPU kernels). Read from the class's own namespace by :meth:`active_kernel_mode`, so
    #: a subclass, which may change the rule, declares it again or gets None.
    kernel_mode: str | None = None

    def __init__(self, slope: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("slope", torch.tensor(1.0, dtype=torch.float32))
        self.set_slope(slope)

    def set_slope(self, slope: float) -> None:
        """Set the hard-sigmoid slope ``a`` (must be a finite number > 0)."""
        slope = float(slope)
        if not (slope > 0.0 and slope < float("inf")):
            raise ValueError(f"{type(self).__name__}: the slope must be a positive finite number, got {slope}")
        self.slope.fill_(slope)

    def probability(self, logit: Tensor) -> Tensor:
        """``hard_sigm(a * z~)``: the probability-like value every estimator starts from."""
        logit = logit.float() if logit.dtype in (torch.float16, torch.bfloat16) else logit
        return hard_sigmoid(logit, self.slope.to(logit.dtype))

    def active_kernel_mode(self) -> str | None:
        """The kernel rule for the module as it is now (:attr:`kernel_mode`, declared on this
        very class; None when inherited)."""
        return vars(type(self)).get("kernel_mode")

    def forward(self, logit: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Return the boundary state for ``logit`` (shape ``[batch]``)."""
        raise NotImplementedError

    def auxiliary_loss(self, output: StackOutput, step_loss: Tensor) -> Tensor | None:
        """Extra loss term to add to the task loss, or None.

        Args:
            output: what the stack returned for this batch (boundary logits, states, operations).
            step_loss: the task loss of every step, shape ``[batch, time]``, already detached.
        """
        return None

    def extra_repr(self) -> str:
        return f"slope={float(self.slope):g}"


class _StraightThrough(torch.autograd.Function):
    """Forward: the hard decision, bit-exact. Backward: the gradient goes to ``surrogate``."""

    @staticmethod
    def forward(ctx, hard: Tensor, surrogate: Tensor) -> Tensor:  # type: ignore[override]
        return hard

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return None, grad


def straight_through(hard: Tensor, surrogate: Tensor) -> Tensor:
    """Value of ``hard``, gradient of ``surrogate``.

    Written as an autograd function rather than ``p + (z - p).detach()`` because the
    latter is not always exactly 0 or 1 in floating point.
    """
    return _StraightThrough.apply(hard.to(surrogate.dtype), surrogate)
