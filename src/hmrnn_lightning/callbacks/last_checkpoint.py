"""``last.ckpt``: the run's newest state, one file, saved often and when the run is stopped."""

from __future__ import annotations

import signal
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Checkpoint


class TrainingInterrupted(Exception):
    """A fit stopped by SIGTERM or SIGINT after saving a resumable ``last.ckpt``.

    Attributes:
        signal_name: ``SIGTERM`` or ``SIGINT``.
        step: the optimizer step the checkpoint holds.
        checkpoint: where it was saved.
        exit_code: 128 + the signal's number, as a shell reports a process killed by it.
    """

    def __init__(self, signal_name: str, signum: int, step: int, checkpoint: Path) -> None:
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint
        self.exit_code = 128 + int(signum)
        run = checkpoint.parent.parent
        super().__init__(
            f"stopped by {signal_name} at step {step}; saved {checkpoint}; resume with: hmrnn fit --resume {run}"
        )


class LastCheckpoint(Checkpoint):
    """Keeps ``checkpoints/last.ckpt`` the newest state of the run, and saves it when the run is stopped.

    ``last.ckpt`` is written (atomically, see :class:`~hmrnn_lightning.checkpoints.AtomicCheckpointIO`)

    - every ``every_n_train_steps`` optimizer steps, so a crash loses at most that many steps;
    - at the end of each validation (the best-so-far bookkeeping and the learning-rate plateau
      state are then current);
    - when training ends (a fit that ``max_steps`` or ``max_time`` stops mid-epoch: after its last
      step, so that a resume continues that epoch);
    - when the process receives SIGTERM (a scheduler's preemption) or SIGINT (Ctrl+C): the
      current step finishes, ``last.ckpt`` is saved at the same point as the periodic saves (so
      ``hmrnn fit --resume RUN`` continues exactly), and the fit stops with
      :class:`TrainingInterrupted`, which ``hmrnn`` reports in one line with exit code 143
      (SIGTERM) or 130 (SIGINT). A second Ctrl+C stops at once without saving.

    This is the only writer of ``last.ckpt``: the CLI turns off ``save_last`` on every
    ``ModelCheckpoint``, which would otherwise write ``last.ckpt`` and ``last-v1.ckpt`` (one per
    callback) at different steps. ``ModelCheckpoint(monitor="val/bpc")`` keeps the best one.

    A :class:`~lightning.pytorch.callbacks.Checkpoint`, so Lightning runs it after the other
    callbacks and in config order among the checkpoint callbacks: list it after
    ``ModelCheckpoint`` so the saved state includes that validation's best-so-far bookkeeping.

    Under DDP every rank takes part in a save; the signal is shared by an all-reduce after each
    step, so all ranks stop at the same step even when only one received it.

    Args:
        every_n_train_steps: save every this many optimizer steps; 0 saves only at validation,
            at the end and when stopped.
        handle_signals: catch SIGTERM and SIGINT during training as described above.
    """

    FILENAME = "last.ckpt"

    def __init__(self, every_n_train_steps: int = 0, handle_signals: bool = True) -> None:
        if every_n_train_steps < 0:
            raise ValueError(f"LastCheckpoint: every_n_train_steps must be >= 0, got {every_n_train_steps}")
        self.every_n_train_steps = every_n_train_steps
        self.handle_signals = handle_signals
        self._received: int | None = None
        self._previous: dict[int, object] = {}
        self._saved_at: int | None = None
        self._stopped_mid_epoch = False

    @property
    def state_key(self) -> str:
        return type(self).__name__

    # -- where ------------------------------------------------------------------------------
    def path(self, trainer: pl.Trainer) -> Path:
        from hmrnn_lightning.run_folder import run_folder

        folder = run_folder(trainer) or Path(trainer.default_root_dir)
        return folder / "checkpoints" / self.FILENAME

    def save(self, trainer: pl.Trainer) -> Path:
        path = self.path(trainer)
        trainer.save_checkpoint(path, weights_only=False)
        self._saved_at = trainer.global_step
        return path

    # -- when -------------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # installed after Lightning's own SIGTERM handler, which would end the fit with exit 0
        # at an epoch's end without saving
        if self.handle_signals and _main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame) -> None:
        if self._received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl+C: stop now
        self._received = signum

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:
        received = self._shared_signal(trainer)
        if received is not None:
            path = self.save(trainer)
            self._restore_handlers()
            raise TrainingInterrupted(signal.Signals(received).name, received, trainer.global_step, path)
        n = self.every_n_train_steps
        # the last step of a fit that max_steps or max_time (the Timer, which runs before this
        # callback) ends mid-epoch is saved here: by on_train_end Lightning has counted the epoch
        # as done, and a resume would start the next one (and a per-epoch slope one step on)
        stopping = trainer.should_stop or 0 < trainer.max_steps <= trainer.global_step
        self._stopped_mid_epoch = stopping and batch_idx + 1 < trainer.num_training_batches
        if ((n and trainer.global_step % n == 0) or self._stopped_mid_epoch) and self._saved_at != trainer.global_step:
            self.save(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            if trainer.should_stop:  # e.g. EarlyStopping: this save is the run's last
                done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
                self._stopped_mid_epoch = done < trainer.num_training_batches
            self.save(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_handlers()
        if not (self._stopped_mid_epoch and self._saved_at == trainer.global_step):
            self.save(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore_handlers()

    # -- helpers ----------------------------------------------------------------------------
    def _shared_signal(self, trainer: pl.Trainer) -> int | None:
        """The signal received by any rank (an all-reduce under DDP; a flag read otherwise)."""
        if trainer.world_size > 1:
            import torch

            flag = torch.tensor([self._received or 0], device=trainer.strategy.root_device)
            flag = trainer.strategy.reduce(flag, reduce_op="max")
            return int(flag.item()) or None
        return self._received

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
