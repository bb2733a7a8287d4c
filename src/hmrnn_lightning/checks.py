"""Checks the CLI makes on built objects before a run writes anything, each failing with one line."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hmrnn_lightning.errors import ConfigError


def check_estimators(model) -> None:
    """Every boundary estimator in the model implements ``forward`` and returns boundary states
    in [0, 1] of its input's shape (a plugin that forgot ``forward``, or returns 2, would
    otherwise pass parsing and fail at the first batch or train on a meaningless state).
    Probed once on a few logits, so training pays nothing."""
    import torch

    from hmrnn_lightning.estimators.base import BoundaryEstimator

    for name, module in model.named_modules():
        if not isinstance(module, BoundaryEstimator):
            continue
        cls = type(module)
        where = f"model.{name} ({cls.__module__}.{cls.__qualname__})"
        if cls.forward is BoundaryEstimator.forward:
            raise ConfigError(f"{where}: a boundary estimator must implement forward(logit) -> boundary states; this class does not")
        logit = torch.linspace(-3.0, 3.0, 7)
        was_training = module.training
        try:
            with torch.no_grad():
                z = module(logit)
        except Exception as exc:  # a plugin's own failure, reported with its place
            raise ConfigError(f"{where}: forward failed on the logits -3..3: {type(exc).__name__}: {exc}") from None
        finally:
            module.train(was_training)
        if not isinstance(z, torch.Tensor) or z.shape != logit.shape:
            got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ConfigError(f"{where}: forward must return a tensor of its input's shape {tuple(logit.shape)}, got {got}")
        if not bool(((z >= 0) & (z <= 1)).all()):
            raise ConfigError(
                f"{where}: forward must return boundary states in [0, 1], got {[round(float(v), 3) for v in z]} for the logits -3..3"
            )


def writable_problem(folder: str | Path) -> str | None:
    """What stops ``folder`` from being created and written in, or ``None``: the nearest existing
    folder on its way is a file, or cannot be written in. Probed by creating a temporary file
    there, since permission bits alone miss read-only mounts (and do not bind root)."""
    path = Path(folder).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        return f"cannot write in {existing} ({exc.strerror or exc})"
    return None


def check_writable_places(root: str | None, loggers: list) -> None:
    """``root`` (the trainer's ``default_root_dir``, the working folder if None) and each logger's
    ``save_dir`` can be created and written (:func:`writable_problem`), before anything is written."""
    import os

    places = [("trainer.default_root_dir", root or os.getcwd())]
    places += [(f"{type(lg).__name__} save_dir", lg.save_dir) for lg in loggers if getattr(lg, "save_dir", None)]
    for key, place in places:
        problem = writable_problem(place)
        if problem is None:
            continue
        if problem.startswith("cannot write"):
            raise ConfigError(f"{key}: {problem}; give a writable folder, e.g. --trainer.default_root_dir=runs")
        raise ConfigError(f"{key}: cannot create {Path(place).absolute()}: {problem}")


def check_trainer_settings(trainer_cfg: dict) -> None:
    """Trainer values Lightning accepts with a meaning nobody asks for."""
    clip = trainer_cfg.get("gradient_clip_val")
    if clip is not None and not float(clip) >= 0:
        raise ConfigError(f"trainer.gradient_clip_val: must be >= 0 (0 or null: no clipping), got {clip}")
