"""Loading a checkpoint for a small command, with one clear line when it cannot be used."""

from __future__ import annotations

from pathlib import Path

from hmrnn_lightning.data.base import DataError


def load_model(path: str, cls: type, map_location: str = "cpu"):
    """``cls`` restored from the checkpoint at ``path``.

    Uses :func:`hmrnn_lightning.checkpoints.load_model` where the package has it (it turns a
    truncated, foreign or wrong-kind checkpoint into one message); otherwise checks only that
    the file exists and lets ``load_from_checkpoint`` do the rest.
    """
    try:
        from hmrnn_lightning.checkpoints import load_model as checked_load  # type: ignore[attr-defined]
    except ImportError:
        checked_load = None
    if checked_load is not None:
        return checked_load(path, cls)
    if not Path(path).is_file():
        raise DataError(f"checkpoint not found: {path}")
    return cls.load_from_checkpoint(path, map_location=map_location)
