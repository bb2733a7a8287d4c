"""Pieces shared by the LightningModules."""

from __future__ import annotations


def clip_gradients_by_default(module, optimizer, gradient_clip_val, gradient_clip_algorithm) -> None:
    """``configure_gradient_clipping`` body: the Trainer's setting if given, else the model's
    ``grad_clip_norm`` hyperparameter (the paper clips the global norm at 1)."""
    if gradient_clip_val is None and module.hparams.grad_clip_norm is not None:
        gradient_clip_val, gradient_clip_algorithm = module.hparams.grad_clip_norm, "norm"
    if gradient_clip_val:
        module.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm or "norm")


def announce_stack_path(module) -> None:
    """``on_fit_start`` body: say once, on rank 0, which time loop the stack runs on this device
    (:meth:`HMStack.active_impl`), so that a GPU run on a slower path than expected says so."""
    from lightning.pytorch.utilities import rank_zero_info

    stack = getattr(module, "stack", None)
    if stack is None or not hasattr(stack, "active_impl"):
        return  # the LSTM baselines have one path
    impl = stack.active_impl(module.device)
    graphs = ", training windows and sampling steps captured in CUDA graphs" if impl == "triton" and stack.cuda_graph else ""
    rank_zero_info(f"hmrnn: the stack runs impl={impl} on {module.device.type}{graphs}")


def default_callbacks(module) -> list:
    """``configure_callbacks`` body: :class:`FaultDetection`, :class:`TrainingHealth` and
    :class:`LostRank` with their defaults, and Lightning's ``LearningRateMonitor`` when the run
    has a logger (so the divisions by ``lr_decay_factor`` show), each unless the Trainer already
    has one of that type (the user's settings win)."""
    from lightning.pytorch.callbacks import LearningRateMonitor

    from hmrnn_lightning.callbacks import FaultDetection, LostRank, TrainingHealth

    trainer = module.trainer if module._trainer is not None else None
    present = trainer.callbacks if trainer is not None else []
    wanted = [FaultDetection, TrainingHealth, LostRank]
    if trainer is not None and trainer.loggers:
        wanted.append(LearningRateMonitor)
    return [cls() for cls in wanted if not any(isinstance(cb, cls) for cb in present)]
