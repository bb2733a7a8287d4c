"""The slope annealing trick (section 3.3): make the hard sigmoid steeper as training goes."""

from __future__ import annotations

from typing import Literal

import lightning.pytorch as pl

from hmrnn_lightning.estimators.base import BoundaryEstimator


def annealed_slope(progress: float, a_max: float = 5.0, rate: float = 0.04, start: float = 1.0) -> float:
    """``a = min(a_max, start + rate * progress)``; progress is epochs (or steps)."""
    return min(a_max, start + rate * progress)


class SlopeAnnealing(pl.Callback):
    """Sets the slope ``a`` of every boundary estimator of the model during training.

    The paper's PTB schedule is ``a = min(5, 1 + 0.04 * epoch)``. With ``interval="step"``
    ``progress`` counts optimizer steps instead of epochs. The slope is a buffer of the
    estimator, so it is in checkpoints; it is recomputed from the epoch/step on resume, so
    both agree. The model logs the current value as ``slope``.

    ``steps_per_epoch`` (with ``interval="step"``) expresses an epoch schedule in steps:
    ``progress = step / steps_per_epoch`` epochs, so ``rate`` stays "per epoch" and the slope
    grows a little every step instead of jumping once an epoch; e.g. the paper's schedule on
    PTB at batch 32 x 100 (1,567 steps an epoch) is ``{rate: 0.04, interval: step,
    steps_per_epoch: 1567}``, reaching 5 at step 156,700. Why a count rather than the
    trainer's own epoch length: a run cut short by ``max_time`` or ``limit_train_batches``
    must keep the schedule of the full epoch it is measured against.

    Args:
        a_max: largest slope.
        rate: slope added per epoch (or per step; per epoch again with ``steps_per_epoch``).
        start: slope at progress 0.
        interval: ``epoch`` or ``step``.
        steps_per_epoch: with ``interval: step``, the steps in one epoch: ``rate`` is then per
            epoch, applied in fractions every step (null: ``rate`` is per step).
    """

    def __init__(
        self, a_max: float = 5.0, rate: float = 0.04, start: float = 1.0, interval: Literal["epoch", "step"] = "epoch",
        steps_per_epoch: int | None = None,
    ) -> None:
        if a_max <= 0 or start <= 0:
            raise ValueError(f"SlopeAnnealing: a_max and start must be > 0, got a_max={a_max}, start={start}")
        if rate < 0:
            raise ValueError(f"SlopeAnnealing: rate must be >= 0, got {rate}")
        if steps_per_epoch is not None and (interval != "step" or int(steps_per_epoch) <= 0):
            raise ValueError(f"SlopeAnnealing: steps_per_epoch must be a positive count and goes with interval: step, "
                             f"got steps_per_epoch={steps_per_epoch}, interval={interval}")
        self.a_max, self.rate, self.start, self.interval = a_max, rate, start, interval
        self.steps_per_epoch = None if steps_per_epoch is None else int(steps_per_epoch)

    def slope_at(self, progress: float) -> float:
        return annealed_slope(progress, self.a_max, self.rate, self.start)

    def _apply(self, pl_module: pl.LightningModule, progress: float) -> float:
        slope = self.slope_at(progress)
        for module in pl_module.modules():
            if isinstance(module, BoundaryEstimator):
                module.set_slope(slope)
        return slope

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.interval == "epoch":
            self._apply(pl_module, trainer.current_epoch)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if self.interval == "step":
            self._apply(pl_module, trainer.global_step / (self.steps_per_epoch or 1))
