"""Signs of a coming collapse, logged during training: gradient norm, boundary rates, operations."""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from hmrnn_lightning.metrics.boundaries import BoundaryStatistics


class TrainingHealth(pl.Callback):
    """Every ``every_n_steps`` optimizer steps, logs under ``health/``:

    * ``grad_norm``: the global gradient norm before clipping, of that step (growing by orders
      of magnitude is how an exploding recurrence shows itself before it overflows);
    * per layer, over the steps since the last log: ``boundary_rate/l{k}``,
      ``{update,copy,flush}_frac/l{k}`` and ``unnested/l{k}`` (:class:`BoundaryStatistics`). A
      layer whose boundary rate goes to 0 or 1 has stopped segmenting.

    Reads the boundaries and operations a training step returns (``"boundaries"`` and
    ``"operations"`` in its output dict); models that return only a loss get the gradient
    norm alone.

    Args:
        every_n_steps: log interval in optimizer steps.
    """

    def __init__(self, every_n_steps: int = 200) -> None:
        if every_n_steps < 1:
            raise ValueError(f"TrainingHealth: every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self._stats: BoundaryStatistics | None = None
        self._grad_norm: float | None = None

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        if trainer.global_step % self.every_n_steps:
            return
        grads = [p.grad.detach().float() for p in pl_module.parameters() if p.grad is not None]
        if grads:
            self._grad_norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:
        if isinstance(outputs, dict) and "boundaries" in outputs:
            boundaries, operations = outputs["boundaries"], outputs["operations"]
            if self._stats is None or self._stats.num_layers != boundaries.shape[-1]:
                self._stats = BoundaryStatistics(boundaries.shape[-1]).to(boundaries.device)
            self._stats.update(boundaries, operations)
        step = trainer.global_step - 1  # the optimizer step this batch took
        if step % self.every_n_steps:
            return
        metrics = {} if self._grad_norm is None else {"health/grad_norm": self._grad_norm}
        if self._stats is not None:
            metrics.update({f"health/{k}": float(v) for k, v in self._stats.compute().items()})
            self._stats.reset()
        self._grad_norm = None
        # straight to the loggers: these are interval summaries, not per-step values for
        # Lightning to cache and repeat at its own log_every_n_steps
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
