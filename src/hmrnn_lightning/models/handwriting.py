"""Handwriting model of section 4.2: pen offsets in, a mixture density over the next offset out."""

from __future__ import annotations

import math
from typing import Any, Callable

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor

from hmrnn_lightning.cells.stack import RecurrentStack, StackOutput
from hmrnn_lightning.heads.mdn import MixtureDensityHead
from hmrnn_lightning.models.common import (
    announce_stack_path, check_rate_target, clip_gradients_by_default, default_callbacks, rate_penalty,
)
from hmrnn_lightning.metrics import BoundaryStatistics, SequenceLogLikelihood

StackFactory = Callable[[int], RecurrentStack]
MDNFactory = Callable[[list[int]], MixtureDensityHead]


class HandwritingModel(pl.LightningModule):
    """HM-LSTM (or LSTM) stack on ``(dx, dy, pen)`` offsets with a mixture density head.

    Each batch is whole lines ``(inputs, targets, mask)`` padded to the longest; the state starts
    at zero for every line and padded steps count in neither loss nor metrics. The metric is
    the paper's: the average over sequences of the summed log-likelihood, in nats
    (``val/loglik``), on offsets normalised by the training set's mean and standard deviation.
    ``val/loglik_raw`` is the same likelihood for offsets in the database's own units
    (``loglik - steps * log(std_x * std_y)``); the paper does not say which it reports.

    Args:
        stack: builds the recurrent stack from the input size (3).
        head: builds the mixture density head from the layer sizes.
        lr: Adam learning rate (the paper: 0.0003).
        grad_clip_norm: clip the global gradient norm (None: no clipping).
        stats: ``{"mean": [mx, my], "std": [sx, sy]}`` of training offsets (linked from the data by
            the CLI); stored in checkpoints and used to draw samples in real units.
        boundary_rate_target: per boundary layer (bottom first) a firing rate to pull it towards,
            or None to leave a layer free; None (the default, and the paper) adds nothing. Not in
            the paper; as :class:`~hmrnn_lightning.models.HMRNNLanguageModel`'s option, with the
            rate counted over the lines' real steps (padding left out). Logged as
            ``train/rate_penalty``.
        boundary_rate_weight: the penalty's weight against the per-step NLL (nats).
    """

    def __init__(
        self,
        stack: StackFactory,
        head: MDNFactory,
        lr: float = 0.0003,
        grad_clip_norm: float | None = 1.0,
        stats: dict[str, list[float]] | None = None,
        boundary_rate_target: list[float | None] | None = None,
        boundary_rate_weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.stack = stack if isinstance(stack, RecurrentStack) else stack(3)
        if self.stack.input_size != 3:
            raise ValueError(f"HandwritingModel: the stack must take 3 inputs (dx, dy, pen), it takes {self.stack.input_size}")
        self.head = head if isinstance(head, MixtureDensityHead) else head(list(self.stack.hidden_sizes))
        self.stats = stats
        L = self.stack.num_layers
        self.val_ll, self.test_ll = SequenceLogLikelihood(), SequenceLogLikelihood()
        self.val_ll_raw, self.test_ll_raw = SequenceLogLikelihood(), SequenceLogLikelihood()
        self.val_boundaries, self.test_boundaries = BoundaryStatistics(L), BoundaryStatistics(L)
        boundary_layers = L - 1 if self.estimator is not None else 0
        check_rate_target(type(self).__name__, boundary_rate_target, boundary_rate_weight, boundary_layers)

    @property
    def estimator(self):
        return getattr(self.stack, "estimator", None)

    def forward(self, inputs: Tensor, state=None) -> tuple[Tensor, StackOutput]:
        if inputs.dim() != 3 or inputs.shape[-1] != 3:
            raise ValueError(f"HandwritingModel: expected inputs [batch, time, 3], got {tuple(inputs.shape)}")
        out = self.stack(inputs, state)
        return self.head(out.hidden), out

    def _log_det(self) -> float:
        if self.stats is None:
            return 0.0
        sx, sy = self.stats["std"]
        return math.log(sx * sy)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        inputs, targets, mask = batch
        params, out = self(inputs)
        ll = self.head.log_likelihood(params, targets)
        steps = mask.sum().clamp_min(1)
        loss = -(ll * mask).sum() / steps
        total = loss
        if self.estimator is not None:
            aux = self.estimator.auxiliary_loss(out, (-ll * mask).detach())
            if aux is not None:
                total = total + aux
            self.log("train/slope", self.estimator.slope, batch_size=inputs.shape[0])
            penalty = rate_penalty(out.boundary_logits, self.hparams.get("boundary_rate_target"),
                                   self.hparams.boundary_rate_weight, mask)
            if penalty is not None:
                total = total + penalty
                self.log("train/rate_penalty", penalty, batch_size=inputs.shape[0])
        self.log("train/nll_per_step", loss, prog_bar=True, batch_size=inputs.shape[0])
        self.log("train/loglik", (ll * mask).sum() / inputs.shape[0], batch_size=inputs.shape[0])
        return total

    def _eval(self, batch: Any, ll_metric, raw_metric, stats: BoundaryStatistics) -> None:
        inputs, targets, mask = batch
        params, out = self(inputs)
        ll = self.head.log_likelihood(params, targets)
        ll_metric.update(ll, mask)
        raw_metric.update(ll - self._log_det(), mask)
        stats.update(out.boundaries, out.operations, mask)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval(batch, self.val_ll, self.val_ll_raw, self.val_boundaries)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval(batch, self.test_ll, self.test_ll_raw, self.test_boundaries)

    def _log_epoch(self, stage: str, ll, raw, stats) -> None:
        self.log(f"{stage}/loglik", ll.compute(), prog_bar=True)
        self.log(f"{stage}/loglik_raw", raw.compute())
        for key, v in stats.compute().items():
            self.log(f"{stage}/{key}", v)
        for m in (ll, raw, stats):
            m.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val", self.val_ll, self.val_ll_raw, self.val_boundaries)

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test", self.test_ll, self.test_ll_raw, self.test_boundaries)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        clip_gradients_by_default(self, optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_fit_start(self) -> None:
        """Says which time loop the stack runs (:func:`announce_stack_path`)."""
        announce_stack_path(self)

    def configure_callbacks(self) -> list:
        """Fault detection and training-health logging on every run (:func:`default_callbacks`)."""
        return default_callbacks(self)

    # -- pictures ------------------------------------------------------------------------------------
    def to_real_units(self, seq: Tensor) -> np.ndarray:
        out = seq.detach().cpu().numpy().astype(np.float64).copy()
        if self.stats is not None:
            out[:, :2] = out[:, :2] * np.array(self.stats["std"]) + np.array(self.stats["mean"])
        return out

    @torch.no_grad()
    def generate(self, length: int = 600, bias: float = 0.0) -> np.ndarray:
        """Sample ``length`` offsets ``(dx, dy, pen)`` in the database's units."""
        was_training = self.training
        self.eval()
        x = torch.zeros(1, 1, 3, device=self.head.params.weight.device)
        state, produced, cache = None, [], None
        for _ in range(length):
            out = self.stack.step(x[:, 0], state)  # skips the work COPY leaves out
            (params, cache), state = self.head.step(out, cache), out.state
            nxt = self.head.sample(params[:, -1], bias)
            produced.append(nxt[0])
            x = nxt.view(1, 1, 3)
        self.train(was_training)
        return self.to_real_units(torch.stack(produced))

    @torch.no_grad()
    def boundaries_of(self, inputs: Tensor) -> Tensor:
        """``[time, layers]`` boundaries for one normalised sequence ``[time, 3]``."""
        was_training = self.training
        self.eval()
        _, out = self(inputs.unsqueeze(0).to(self.head.params.weight.device))
        self.train(was_training)
        return out.boundaries[0].cpu()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["hmrnn_stroke_stats"] = self.stats

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if checkpoint.get("hmrnn_stroke_stats") is not None:
            self.stats = checkpoint["hmrnn_stroke_stats"]
