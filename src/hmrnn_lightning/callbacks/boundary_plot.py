"""Draws the boundary figure at the end of validation and hands it to the logger."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl

from hmrnn_lightning.viz.boundaries import plot_boundaries


class BoundaryPlot(pl.Callback):
    """After each validation run, plot a text window (Figures 3-4) into the run folder's
    ``boundaries/epochEEEE-stepSSSSSSS.png`` (one file per validation, kept, whatever the logger,
    W&B included) and log it as an image where the logger can take one (W&B, TensorBoard).
    Stacks without boundaries (the LSTM baselines) get no picture. Where the datamodule knows
    the validation split's boundaries (the synthetic corpus's levels), they are drawn in red
    under the model's rows.

    Args:
        text: the text to draw; default: the first ``length`` symbols of the validation split.
        length: symbols taken from the validation split when ``text`` is not given.
        every_n_epochs: draw every this many epochs.
    """

    def __init__(self, text: str | None = None, length: int = 80, every_n_epochs: int = 1) -> None:
        self.text, self.length, self.every_n_epochs = text, length, every_n_epochs

    def _text(self, trainer: pl.Trainer) -> str | None:
        if self.text is not None:
            return self.text
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "split_ids"):
            return None
        return dm.vocab.decode(dm.split_ids("valid")[: self.length])

    def _gold(self, trainer: pl.Trainer, length: int) -> dict | None:
        """The datamodule's known boundaries of the drawn validation text, by level."""
        dm = trainer.datamodule
        if self.text is not None or dm is None or not hasattr(dm, "boundary_labels"):
            return None
        labels = dm.boundary_labels("valid")
        if labels is None:
            return None
        levels = dm.boundary_levels() if hasattr(dm, "boundary_levels") else None
        labels = labels[:length].numpy()
        if levels is None or len(levels) != labels.shape[-1]:
            levels = [f"level{k + 1}" for k in range(labels.shape[-1])]
        return {level: labels[:, k] for k, level in enumerate(levels)}

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.current_epoch % self.every_n_epochs:
            return
        log_dir = trainer.log_dir  # a collective under DDP: every rank must ask, before rank 0 goes on alone
        if not trainer.is_global_zero:
            return
        text = self._text(trainer)
        if not text or getattr(pl_module, "vocab", None) is None:
            return
        stack = getattr(pl_module, "stack", None)
        from hmrnn_lightning.cells import LSTMStack

        if isinstance(stack, LSTMStack):
            return  # no boundaries to draw: every panel would be empty
        z, norms = pl_module.analyse(text)
        from hmrnn_lightning.run_folder import run_folder

        out_dir = (run_folder(trainer) or Path(log_dir or trainer.default_root_dir)) / "boundaries"
        name = f"epoch{trainer.current_epoch:04d}-step{trainer.global_step:07d}.png"
        path = plot_boundaries(text, z.numpy(), norms.numpy(), out_dir / name,
                               title=f"epoch {trainer.current_epoch}, step {trainer.global_step}",
                               gold=self._gold(trainer, len(text)))
        logger = trainer.logger
        if logger is None:
            return
        if hasattr(logger, "log_image"):  # WandbLogger
            logger.log_image(key="boundaries", images=[str(path)], step=trainer.global_step)
        elif hasattr(getattr(logger, "experiment", None), "add_image"):  # TensorBoard
            import matplotlib.image as mpimg

            logger.experiment.add_image("boundaries", mpimg.imread(path), trainer.global_step, dataformats="HWC")
