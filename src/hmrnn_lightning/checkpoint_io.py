"""Writing checkpoints so that a run killed during a save keeps its previous checkpoint."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made atomic on a local filesystem wherever the run folder is.

    Lightning 2.6 writes into a temporary file in the system's temporary folder, then moves it
    over the target; when the run folder is on another filesystem (a tmpfs, an NFS mount) the move
    is a copy over the old file, so a kill during it leaves neither the old nor the new checkpoint
    whole. Here the bytes go to a hidden file beside the target (``.last.ckpt.tmp-PID``), are
    flushed to disk (``fsync``), and the file is renamed over the target, which one filesystem
    does atomically; the folder is synced so the rename survives a power loss. On any failure the
    temporary file is removed and the target is untouched (a ``kill -9`` can leave the hidden file;
    the next fit in that folder removes it). Remote paths (``s3://``...) are left to Lightning.

    ``hmrnn fit`` uses it unless the config names its own ``CheckpointIO`` plugin.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.filename is None:  # a failed write names no file (ENOSPC, EIO): say which checkpoint
                raise OSError(exc.errno, exc.strerror, str(target)) from exc
            raise
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_folder(target.parent)


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # not every filesystem syncs folders; the rename is atomic all the same
    finally:
        os.close(fd)
