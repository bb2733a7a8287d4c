"""Score-function (REINFORCE) gradient for sampled boundaries."""

from __future__ import annotations

import torch
from torch import Tensor

from hmrnn_lightning.estimators.base import BoundaryEstimator


class ReinforceEstimator(BoundaryEstimator):
    """``z ~ Bernoulli(hard_sigm(a z~))`` with no gradient through ``z`` itself.

    The boundary detector learns from the surrogate loss
    ``sum_{t,l} (loss_t - b) * log p(z^l_t)`` (Williams 1992), where ``loss_t`` is the
    task loss of step ``t`` and ``b`` an exponential moving average of the mean step loss.

    Choices (the issue asks for the per-step loss):
      * the reward of a decision at step ``t`` is the loss of step ``t`` only, not the
        loss-to-go; ``z^l_t`` changes step ``t``'s prediction through layer ``l+1`` and
        using one step keeps the variance low, at the price of ignoring later effects;
      * decisions made while a layer is in COPY are not decisions (``z`` is carried), so
        they get no score term;
      * ``p`` is clamped to ``[eps, 1 - eps]`` inside the log; where the hard sigmoid
        saturates its gradient is 0 anyway.

    Args:
        slope: initial slope ``a`` of the hard sigmoid.
        baseline_decay: weight of the old value in the moving-average baseline.
        sample_at_eval: keep sampling in eval mode (default: deterministic threshold).
        eps: clamp of ``p`` inside the log.
    """

    def __init__(
        self,
        slope: float = 1.0,
        baseline_decay: float = 0.99,
        sample_at_eval: bool = False,
        eps: float = 1e-6,
    ) -> None:
        super().__init__(slope)
        if not 0.0 <= baseline_decay < 1.0:
            raise ValueError(f"ReinforceEstimator: baseline_decay must be in [0, 1), got {baseline_decay}")
        self.baseline_decay = baseline_decay
        self.sample_at_eval = sample_at_eval
        self.eps = eps
        self.register_buffer("baseline", torch.tensor(0.0))
        self.register_buffer("baseline_ready", torch.tensor(False))

    def forward(self, logit: Tensor) -> Tensor:
        p = self.probability(logit).detach()
        if self.training or self.sample_at_eval:
            return torch.bernoulli(p)
        return (p > 0.5).to(p.dtype)

    def log_prob(self, logit: Tensor, z: Tensor) -> Tensor:
        """``log Bernoulli(z; hard_sigm(a logit))``, differentiable in ``logit``."""
        p = self.probability(logit).clamp(self.eps, 1.0 - self.eps)
        return torch.where(z > 0.5, torch.log(p), torch.log1p(-p))

    def surrogate(self, logit: Tensor, z: Tensor, reward_loss: Tensor, mask: Tensor | None = None) -> Tensor:
        """Score-function surrogate whose gradient is the REINFORCE estimate.

        Args:
            logit: boundary logits, any shape.
            z: sampled boundaries, same shape.
            reward_loss: loss attributed to each decision, broadcastable to ``logit``.
            mask: 1 where a decision was really taken.
        """
        advantage = (reward_loss - self.baseline).detach()
        term = advantage * self.log_prob(logit, z)
        if mask is not None:
            term = term * mask
        return term.sum()

    def update_baseline(self, mean_loss: Tensor) -> None:
        mean_loss = mean_loss.detach().float()
        if not bool(self.baseline_ready):
            self.baseline.copy_(mean_loss)
            self.baseline_ready.fill_(True)
        else:
            self.baseline.mul_(self.baseline_decay).add_((1 - self.baseline_decay) * mean_loss)

    def auxiliary_loss(self, output, step_loss: Tensor) -> Tensor | None:
        if not self.training or output.boundary_logits.shape[-1] == 0:
            return None
        decided = 1.0 - output.operations[..., :-1, 1]  # not COPY, layers with a detector
        z = output.boundaries[..., :-1]
        reward = step_loss.detach().float().unsqueeze(-1)
        loss = self.surrogate(output.boundary_logits, z, reward, decided) / step_loss.numel()
        self.update_baseline(step_loss.mean())
        return loss
