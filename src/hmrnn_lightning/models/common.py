"""Pieces shared by the LightningModules."""

from __future__ import annotations


def clip_gradients_by_default(module, optimizer, gradient_clip_val, gradient_clip_algorithm) -> None:
    """``configure_gradient_clipping`` body: the Trainer's setting if given, else the model's
    ``grad_clip_norm`` hyperparameter (the paper clips the global norm at 1)."""
    if gradient_clip_val is None and module.hparams.grad_clip_norm is not None:
        gradient_clip_val, gradient_clip_algorithm = module.hparams.grad_clip_norm, "norm"
    if gradient_clip_val:
        module.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm or "norm")


def default_callbacks(module) -> list:
    """``configure_callbacks`` body: :class:`FaultDetection`, :class:`TrainingHealth` and
    :class:`LostRank` with their defaults, unless the Trainer already has one of that type (the
    user's settings win)."""
    from hmrnn_lightning.callbacks import FaultDetection, LostRank, TrainingHealth

    present = module.trainer.callbacks if module._trainer is not None else []
    return [cls() for cls in (FaultDetection, TrainingHealth, LostRank) if not any(isinstance(cb, cls) for cb in present)]
