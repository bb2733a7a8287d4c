"""Reading and writing checkpoints.

Reading: every way a file can be unusable becomes one :class:`CheckpointError` line.
Writing is :mod:`hmrnn_lightning.checkpoint_io` (atomic saves).

``load_checkpoint`` reads a ``.ckpt`` file written by ``hmrnn fit`` (or Lightning) with
``torch.load(weights_only=True)`` and checks, in this order, that the file exists and is not
empty, that it is a PyTorch archive and whole, that the safe loader accepts it, that it holds a
Lightning ``state_dict``, that it was written by the model class that is needed, and that its
weights are finite. ``load_model`` builds the model from it. The CLI (``hmrnn fit/validate/test
--ckpt_path``) and the small commands (``hmrnn sample``, ``plot-boundaries``, ``sample-strokes``)
read checkpoints through these two functions only.
"""

from __future__ import annotations

import inspect
import pickle
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch and Lightning are imported when a checkpoint is read, not before
    from lightning.pytorch import LightningModule

#: first bytes of a zip archive (PyTorch >= 1.6 writes checkpoints as zip) and of a pickle stream
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_MAGIC = b"\x80"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what is wrong with it."""


def load_checkpoint(path: str | Path, expected: type | None = None) -> dict[str, Any]:
    """Read and check a checkpoint on the CPU.

    Args:
        path: the ``.ckpt`` file.
        expected: the LightningModule class the checkpoint must have been written by (a subclass
            is fine); ``None`` skips that check.

    Returns:
        The checkpoint dictionary (``state_dict``, ``hyper_parameters``...), tensors on the CPU.

    Raises:
        CheckpointError: the file is missing, empty, truncated or corrupt, not a checkpoint,
            refused by the safe loader, written by another model class, or holds non-finite
            weights.
    """
    path = Path(path)
    _check_file(path)
    ckpt = _safe_load(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        what = type(ckpt).__name__ if not isinstance(ckpt, dict) else "a dictionary without a 'state_dict'"
        raise CheckpointError(f"checkpoint {path}: not a Lightning checkpoint (it holds {what})")
    if expected is not None:
        _check_class(path, ckpt, expected)
    _check_finite(path, ckpt["state_dict"])
    return ckpt


def load_model(path: str | Path, cls: type[LightningModule]) -> LightningModule:
    """The model of class ``cls`` stored in the checkpoint ``path``, on the CPU, in eval mode.

    Raises:
        CheckpointError: as :func:`load_checkpoint`, or the weights do not fit the model the
            checkpoint's own hyperparameters describe.
    """
    load_checkpoint(path, expected=cls)
    try:
        model = cls.load_from_checkpoint(str(path), map_location="cpu", weights_only=True)
    except RuntimeError as exc:
        # load_state_dict's report of missing, unexpected or mis-sized weights
        if "state_dict" not in str(exc):
            raise
        detail = " ".join(str(exc).split())
        raise CheckpointError(f"checkpoint {path}: its weights do not fit the model its hyperparameters describe: {detail[:300]}") from None
    return model.eval()


def check_fits(path: str | Path, ckpt: dict[str, Any], model) -> None:
    """The checkpoint's weights have the names and shapes of ``model``'s (checked before Lightning
    loads them, whose report is a multi-line traceback).

    Raises:
        CheckpointError: a weight is missing, extra, or of another shape; the first of each is named.
    """
    have = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    saved = {k: tuple(v.shape) for k, v in ckpt["state_dict"].items() if hasattr(v, "shape")}
    problems = []
    missing = [k for k in have if k not in saved]
    extra = [k for k in saved if k not in have]
    resized = [k for k in have if k in saved and have[k] != saved[k]]
    if missing:
        problems.append(f"{len(missing)} missing (first: {missing[0]})")
    if extra:
        problems.append(f"{len(extra)} not in the model (first: {extra[0]})")
    if resized:
        k = resized[0]
        problems.append(f"{len(resized)} of another size (first: {k}, {list(saved[k])} in the checkpoint, {list(have[k])} in the model)")
    if problems:
        raise CheckpointError(f"checkpoint {path}: its weights do not fit the model: {'; '.join(problems)}")


def checkpoint_class_path(ckpt: dict[str, Any]) -> str | None:
    """The class path of the model that wrote ``ckpt`` (recorded by LightningCLI), if known."""
    hparams = ckpt.get("hyper_parameters")
    path = hparams.get("_class_path") if isinstance(hparams, dict) else None
    return path if isinstance(path, str) else None


# -- the checks, one each ---------------------------------------------------------------------------


def _check_file(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"checkpoint {path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path}: is a folder, not a checkpoint file")
    try:
        with path.open("rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise CheckpointError(f"checkpoint {path}: cannot be read: {exc.strerror or exc}") from None
    if not head:
        raise CheckpointError(f"checkpoint {path}: the file is empty (0 bytes); the run that wrote it may have been cut off")
    if head.startswith(_ZIP_MAGIC):
        if not zipfile.is_zipfile(path):
            raise CheckpointError(
                f"checkpoint {path}: truncated or corrupt ({path.stat().st_size} bytes, the archive has no end); "
                "the run that wrote it may have been cut off"
            )
    elif not head.startswith(_PICKLE_MAGIC):
        raise CheckpointError(f"checkpoint {path}: not a PyTorch checkpoint (neither a PyTorch archive nor a pickle)")


def _safe_load(path: Path) -> Any:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Weights only load failed" not in text:
            raise CheckpointError(f"checkpoint {path}: corrupt: {_first_line(text)}") from None
        raise CheckpointError(
            f"checkpoint {path}: refused by the safe loader (torch.load with weights_only=True): {_refusal_reason(text)}; "
            "a checkpoint may hold only tensors and plain data, because any other pickled object can run code when loaded"
        ) from None
    except (RuntimeError, OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        reason = _first_line(str(exc)) or type(exc).__name__
        raise CheckpointError(f"checkpoint {path}: truncated or corrupt ({reason})") from None


def _check_class(path: Path, ckpt: dict[str, Any], expected: type) -> None:
    written_by = checkpoint_class_path(ckpt)
    if written_by is not None:
        from hmrnn_lightning import registry

        try:
            cls = registry.import_path(written_by)
        except registry.RegistryError as exc:
            raise CheckpointError(f"checkpoint {path}: written by {written_by}, which cannot be imported here ({exc})") from None
        if not (isinstance(cls, type) and issubclass(cls, expected)):
            raise CheckpointError(f"checkpoint {path}: holds {describe(cls)} where {describe(expected)} is needed")
        return
    # no class recorded (saved outside the CLI): the hyperparameters must be arguments of ``expected``
    params = inspect.signature(expected.__init__).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    hparams = ckpt.get("hyper_parameters") or {}
    foreign = sorted(k for k in hparams if k not in params and not k.startswith("_"))
    if foreign:
        raise CheckpointError(
            f"checkpoint {path}: its hyperparameters ({', '.join(foreign)}) are not those of {describe(expected)}; "
            "it was written by another kind of model"
        )


def _check_finite(path: Path, state_dict: dict[str, Any]) -> None:
    import torch

    bad = [
        name for name, t in state_dict.items()
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]
    if bad:
        raise CheckpointError(
            f"checkpoint {path}: {len(bad)} weight tensor(s) hold NaN or infinite values (first: {bad[0]}); "
            "the training run that wrote it diverged"
        )


def describe(cls: type) -> str:
    """``a language model (HMRNNLanguageModel)`` and the like, for messages."""
    from hmrnn_lightning.models import HandwritingModel, HMRNNLanguageModel

    if issubclass(cls, HMRNNLanguageModel):
        return f"a language model ({cls.__name__})"
    if issubclass(cls, HandwritingModel):
        return f"a handwriting model ({cls.__name__})"
    return f"a {cls.__name__}"


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def _refusal_reason(text: str) -> str:
    """The line of torch's weights_only report that says what was refused (not its advice)."""
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(("Trying to load unsupported GLOBAL", "Unsupported global", "Unsupported operand")) or "is blocked" in line:
            return line.rstrip(".")
    return "it holds objects other than tensors and plain data"
