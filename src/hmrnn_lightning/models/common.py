"""Pieces shared by the LightningModules."""

from __future__ import annotations


def clip_gradients_by_default(module, optimizer, gradient_clip_val, gradient_clip_algorithm) -> None:
    """``configure_gradient_clipping`` body: the Trainer's setting if given, else the model's
    ``grad_clip_norm`` hyperparameter (the paper clips the global norm at 1).

    Clipping by norm survives a norm that overflows float32 (:func:`clip_overflowing_norm`)."""
    if gradient_clip_val is None and module.hparams.grad_clip_norm is not None:
        gradient_clip_val, gradient_clip_algorithm = module.hparams.grad_clip_norm, "norm"
    if not gradient_clip_val:
        return
    if (gradient_clip_algorithm or "norm") == "norm" and clip_overflowing_norm(module, gradient_clip_val):
        return
    module.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm or "norm")


def clip_overflowing_norm(module, max_norm: float) -> bool:
    """Clip the global gradient norm in float64 when it overflows float32 though every entry is
    finite; True if it did (the caller clips as usual otherwise, bit for bit as before).

    ``torch.nn.utils.clip_grad_norm_`` sums the squares in the gradients' dtype: past about 1.8e19
    the float32 norm is inf, the clipping factor ``max_norm / inf`` is 0 and every gradient is
    zeroed, step after step, with nothing non-finite for :class:`FaultDetection` to see. That froze
    PTB seed 6 of the CPU config without separators at its unigram rate (4.662 BPC from step 149 to
    1,199; docs/study.md). Clipped in float64 instead, the step keeps its direction and has length
    ``max_norm``. Non-finite entries are left to :class:`FaultDetection`. Said once per model.
    The float32 norm is computed first, as the usual clipping does, so that runs whose norm
    stays in range are not changed at all."""
    import sys

    import torch

    from hmrnn_lightning.callbacks.training_health import global_norm

    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return False
    norm32 = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    if not torch.isinf(norm32):
        return False
    norm = global_norm(grads)
    if not torch.isfinite(norm):
        return False  # an inf or NaN entry: FaultDetection's
    scale = max_norm / (float(norm) + 1e-6)
    for g in grads:
        g.mul_(scale)
    if not getattr(module, "_said_norm_overflow", False):
        module._said_norm_overflow = True
        if module.trainer.is_global_zero:
            sys.stderr.write(f"hmrnn: warning: the gradient norm overflows float32 at step {module.trainer.global_step} "
                             f"({float(norm):.3g}, every entry finite): clipped in float64, as it will be whenever it does "
                             f"(float32 clipping would zero the step)\n")
            sys.stderr.flush()
    return True


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
    # the plateau scheduler is stepped at every validation, but its config says "epoch", which is
    # when the monitor would log it by default: logged by step, a division shows where it happened
    return [LearningRateMonitor(logging_interval="step") if cls is LearningRateMonitor else cls()
            for cls in wanted if not any(isinstance(cb, cls) for cb in present)]


def check_rate_target(owner: str, target: list[float | None] | None, weight: float, boundary_layers: int,
                      name: str = "boundary_rate") -> None:
    """Raise one clear error when ``{name}_target`` does not fit the stack (one entry per
    boundary layer, rates strictly between 0 and 1, a ``{name}_weight`` of at least 0)."""
    if target is None:
        return
    if len(target) != boundary_layers:
        raise ValueError(f"{owner}: {name}_target has {len(target)} entries, the stack has {boundary_layers} "
                         f"boundary layer{'s' if boundary_layers != 1 else ''} (one entry each, null to leave one free)")
    if any(r is not None and not 0.0 < r < 1.0 for r in target) or weight < 0:
        raise ValueError(f"{owner}: {name}_target needs rates strictly between 0 and 1 and "
                         f"{name}_weight >= 0, got {target} and {weight}")


def entropy_guide(boundary_logits, logits, target: list[float | None] | None, weight: float):
    """``weight * sum_l BCE(boundary logit_l, y_l)`` over a window (None without a target, or with
    every entry None), where ``y_l`` marks the ``target_l`` share of the window's positions at
    which the model's own next-symbol distribution (``logits`` ``[B, T, V]``, detached) has the
    highest entropy: the places where what comes next is least known, which on text are the
    ends of words (what follows a word is less predictable than what follows inside one), as in
    Harris's successor variety and Elman's prediction error. Exactly ``round(target_l * B * T)``
    positions are marked (``topk``: ties, as in a young model's flat predictions, cannot mark
    more). The boundary logits ``[B, T, L - 1]`` get the gradient; the head and the entropy do not."""
    import torch
    import torch.nn.functional as F

    if target is None or all(r is None for r in target):
        return None
    with torch.no_grad():
        logp = torch.log_softmax(logits.detach().float(), dim=-1)
        entropy = -(logp.exp() * logp).sum(dim=-1).flatten()
    bce = []
    for l, r in enumerate(target):
        if r is None:
            continue
        marked = torch.zeros_like(entropy)
        marked[entropy.topk(max(1, round(r * entropy.numel()))).indices] = 1.0
        bce.append(F.binary_cross_entropy_with_logits(boundary_logits[..., l].float().flatten(), marked))
    return weight * torch.stack(bce).sum()


def rate_penalty(boundary_logits, target: list[float | None] | None, weight: float, mask=None):
    """``weight * sum_l (rate_l - target_l)^2`` over a window's logits ``[B, T, L - 1]`` (None
    without a target, or with every entry None). ``rate_l`` is the share of the steps (those where
    ``mask`` ``[B, T]`` is true, when given) whose logit is above 0, with a straight-through
    gradient of 1 for each logit's step: a sigmoid of the logit would vanish on saturated logits,
    as the estimator's gradient does."""
    import torch

    if target is None or all(r is None for r in target):
        return None
    logits = boundary_logits.float()
    if mask is None:
        hard, soft = (logits > 0).float().mean(dim=(0, 1)), logits.mean(dim=(0, 1))
    else:
        w = mask.float().unsqueeze(-1)
        n = w.sum().clamp_min(1.0)
        # padded steps carry logits too; NaN (rows a step skipped) would poison the sum, so zero them
        logits = torch.where(w > 0, logits, torch.zeros_like(logits))
        hard, soft = ((logits > 0).float() * w).sum(dim=(0, 1)) / n, (logits * w).sum(dim=(0, 1)) / n
    rate = hard + (soft - soft.detach())
    return weight * torch.stack([(rate[l] - r) ** 2 for l, r in enumerate(target) if r is not None]).sum()
