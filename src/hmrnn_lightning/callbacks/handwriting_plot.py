"""Draws a sampled line and Figure 5 at the end of validation and hands them to the logger."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl

from hmrnn_lightning.viz.handwriting import plot_segments, plot_strokes


class HandwritingPlot(pl.Callback):
    """After validation: a sample of ``length`` points and Figure 5 for validation line ``index``,
    written to ``<log_dir>/handwriting/`` and logged where the logger takes images.

    Args:
        length: points to sample.
        bias: sampling bias (0: the model's own distribution; larger: neater).
        index: which validation line to segment.
        every_n_epochs: draw every this many epochs.
    """

    def __init__(self, length: int = 600, bias: float = 0.5, index: int = 0, every_n_epochs: int = 1) -> None:
        self.length, self.bias, self.index, self.every_n_epochs = length, bias, index, every_n_epochs

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.current_epoch % self.every_n_epochs:
            return
        log_dir = trainer.log_dir  # a collective under DDP: all ranks ask before rank 0 goes on alone
        if not trainer.is_global_zero or not hasattr(pl_module, "generate"):
            return
        out = Path(log_dir or trainer.default_root_dir) / "handwriting"
        e = trainer.current_epoch
        paths = [plot_strokes(pl_module.generate(self.length, self.bias), out / f"sample_epoch{e:04d}.png", f"epoch {e}")]
        dm = trainer.datamodule
        if dm is not None and hasattr(dm, "dataset"):
            ds = dm.dataset("valid")
            inputs, _ = ds[min(self.index, len(ds) - 1)]
            z = pl_module.boundaries_of(inputs).numpy()
            paths.append(plot_segments(pl_module.to_real_units(inputs), z, out / f"segments_epoch{e:04d}.png"))
        logger = trainer.logger
        if logger is not None and hasattr(logger, "log_image"):
            logger.log_image(key="handwriting", images=[str(p) for p in paths], step=trainer.global_step)
