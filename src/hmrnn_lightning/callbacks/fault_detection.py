"""Stop (or skip) a training step whose loss, gradients or weights are not finite.

Without this, a NaN in one step spreads to every weight, training goes on computing NaN, and
the checkpoint callback may still write the NaN model. Here the step that went wrong is
named, the weights from before it are kept, and no checkpoint with a non-finite weight is
ever written.
"""

from __future__ import annotations

import re
from typing import Literal

import lightning.pytorch as pl
import torch
from torch import Tensor


class TrainingFault(RuntimeError):
    """Training met a non-finite loss, gradient or weight; the message names the step and where."""


def describe_parameter(name: str) -> str:
    """``stack.cells.1.bottom_up.weight`` -> ``stack.cells.1.bottom_up.weight (layer 2)``."""
    match = re.search(r"\.(?:cells|layers)\.(\d+)\.", name)
    return f"{name} (layer {int(match.group(1)) + 1})" if match else name


def non_finite(named: list[tuple[str, Tensor]]) -> tuple[list[str], str]:
    """The names whose tensor has a NaN or inf, and which of the two came first (``nan``/``inf``)."""
    if not named:
        return [], ""
    # one host sync for all tensors, not one per tensor
    flags = torch.stack([torch.isfinite(t).all() for _, t in named]).tolist()
    bad = [name for (name, _), ok in zip(named, flags) if not ok]
    kind = ""
    if bad:
        first = dict(named)[bad[0]]
        kind = "nan" if torch.isnan(first).any() else "inf"
    return bad, kind


class FaultDetection(pl.Callback):
    """Checks every training step for non-finite numbers and acts before they spread.

    * the loss, before the backward pass;
    * every gradient, after the backward pass and before clipping and the optimizer step
      (under fp16 with a gradient scaler, non-finite gradients are the scaler's business and
      are left to it);
    * every weight after the optimizer step, every ``check_weights_every_n_steps`` steps (an
      update can overflow from finite gradients, e.g. with a far too high learning rate);
    * every checkpoint before it is written: one holding a non-finite tensor is refused, so
      neither ``best`` nor ``last`` can be a NaN model.

    With ``action="stop"`` the first fault raises :class:`TrainingFault` with one message that
    names the step, the tensor (and its layer) and what went non-finite; the optimizer step is
    not taken, so the weights in memory and every checkpoint already written are from before
    the fault. With ``action="skip"`` a step with a non-finite loss or gradient is skipped
    (its gradients dropped, the carried truncated-BPTT state reset) and counted as
    ``train/skipped_steps``; ``max_consecutive_skips`` skips in a row stop the run as above.
    Non-finite weights always stop it: there is nothing left to skip back to.

    Args:
        action: ``stop`` or ``skip``.
        max_consecutive_skips: with ``skip``, this many skipped steps in a row stop the run.
        check_weights_every_n_steps: how often to check the weights after a step (each check
            is one host synchronisation); 0 turns the check off.
    """

    def __init__(
        self,
        action: Literal["stop", "skip"] = "stop",
        max_consecutive_skips: int = 10,
        check_weights_every_n_steps: int = 1,
    ) -> None:
        if action not in ("stop", "skip"):
            raise ValueError(f"FaultDetection: action must be 'stop' or 'skip', got {action!r}")
        if max_consecutive_skips < 1 or check_weights_every_n_steps < 0:
            raise ValueError(
                "FaultDetection: need max_consecutive_skips >= 1 and check_weights_every_n_steps >= 0, got "
                f"{max_consecutive_skips}, {check_weights_every_n_steps}"
            )
        self.action = action
        self.max_consecutive_skips = max_consecutive_skips
        self.check_weights_every_n_steps = check_weights_every_n_steps
        self.skipped = 0
        self.consecutive = 0
        self._loss_fault: str | None = None

    # -- the checks -------------------------------------------------------------------------------
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        self._loss_fault = None if torch.isfinite(loss).all() else f"the loss is {float(loss.detach().float())}"

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        fault = self._loss_fault
        if fault is None and not _has_grad_scaler(trainer):
            named = [(n, p.grad) for n, p in pl_module.named_parameters() if p.grad is not None]
            bad, kind = non_finite(named)
            if bad:
                fault = (
                    f"non-finite gradient ({kind}) in {describe_parameter(bad[0])}"
                    + (f" and {len(bad) - 1} more of {len(named)} tensors" if len(bad) > 1 else "")
                )
        if fault is None:
            self.consecutive = 0
            return
        if self.action == "skip" and self.consecutive + 1 < self.max_consecutive_skips:
            self.skipped += 1
            self.consecutive += 1
            optimizer.zero_grad(set_to_none=True)  # the optimizer steps over parameters without gradients
            reset = getattr(pl_module, "reset_carried_state", None)
            if reset is not None:
                reset("train")  # the window's final state may hold the NaN too
            pl_module.log("train/skipped_steps", float(self.skipped), batch_size=1)
            return
        if self.action == "skip":
            fault += f" ({self.max_consecutive_skips} steps in a row; {self.skipped + 1} skipped in all)"
        self._stop(trainer, fault, "the optimizer step was not taken; the weights are those from before it")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:
        n = self.check_weights_every_n_steps
        if n and trainer.global_step % n == 0:
            bad, kind = non_finite(list(pl_module.named_parameters()))
            if bad:
                self._stop(
                    trainer,
                    f"the optimizer step made {describe_parameter(bad[0])} {kind}"
                    + (f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else "")
                    + f"; learning rate {_learning_rate(trainer)}",
                    "the weights in memory are lost",
                    step=trainer.global_step - 1,
                )

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        named = [(k, v) for k, v in checkpoint.get("state_dict", {}).items() if torch.is_tensor(v) and v.is_floating_point()]
        bad, kind = non_finite(named)
        if bad:
            raise TrainingFault(
                f"refused to write a checkpoint at step {trainer.global_step}: {describe_parameter(bad[0])} is {kind}"
                + (f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else "")
            )

    # -- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped = int(state_dict.get("skipped", 0))

    def _stop(self, trainer: pl.Trainer, fault: str, consequence: str, step: int | None = None) -> None:
        step = trainer.global_step if step is None else step
        last = _last_checkpoint(trainer)
        raise TrainingFault(
            f"training stopped at step {step} (epoch {trainer.current_epoch}): {fault}; {consequence}; "
            + (f"last checkpoint written: {last}" if last else "no checkpoint was written before it")
        )


def _has_grad_scaler(trainer: pl.Trainer) -> bool:
    return getattr(trainer.precision_plugin, "scaler", None) is not None


def _learning_rate(trainer: pl.Trainer) -> str:
    try:
        return f"{trainer.optimizers[0].param_groups[0]['lr']:g}"
    except (IndexError, KeyError, AttributeError):
        return "unknown"


def _last_checkpoint(trainer: pl.Trainer) -> str | None:
    for cb in trainer.checkpoint_callbacks:
        path = getattr(cb, "last_model_path", "") or getattr(cb, "best_model_path", "")
        if path:
            return path
    return None
