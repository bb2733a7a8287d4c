"""Pieces shared by the LightningModules."""

from __future__ import annotations


def clip_gradients_by_default(module, optimizer, gradient_clip_val, gradient_clip_algorithm) -> None:
    """``configure_gradient_clipping`` body: the Trainer's setting if given, else the model's
    ``grad_clip_norm`` hyperparameter (the paper clips the global norm at 1)."""
    if gradient_clip_val is None and module.hparams.grad_clip_norm is not None:
        gradient_clip_val, gradient_clip_algorithm = module.hparams.grad_clip_norm, "norm"
    if gradient_clip_val:
        module.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm or "norm")
