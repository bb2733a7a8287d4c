"""One line, not a communication library's traceback, when a DDP rank is lost."""

from __future__ import annotations

import os
import sys

import lightning.pytorch as pl
import torch

# What gloo and NCCL say when a peer process has gone (killed, out of memory, crashed).
_LOST_PEER = (
    "Connection closed by peer", "Connection reset by peer", "Broken pipe", "Socket Timeout",
    "NCCL communicator was aborted", "remote process exited", "Connection refused",
)


def is_lost_peer(exception: BaseException) -> bool:
    """Whether ``exception`` is a collective failing because another process has gone."""
    if isinstance(exception, getattr(torch.distributed, "DistNetworkError", ())):
        return True
    return isinstance(exception, RuntimeError) and any(s in str(exception) for s in _LOST_PEER)


class LostRank(pl.Callback):
    """Under DDP, a rank that dies (``kill -9``, out of memory, a crash) makes every other rank
    fail in its next collective with gloo's or NCCL's traceback, which names neither the lost
    rank nor what to do. This callback prints instead, on each surviving rank::

        hmrnn: error: rank 1 of 2 stopped during training (killed or crashed; its own output may say why) ...

    with the ``last.ckpt`` to resume from, and ends the process with exit code 1 at once (its
    peers are gone, so no collective of an orderly shutdown could complete). With two ranks the
    lost one is named; with more, the survivors cannot tell which it was. ``HMRNN_DEBUG=1``
    keeps the original traceback as well.
    """

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if trainer.world_size <= 1 or not is_lost_peer(exception):
            return
        me, world = trainer.global_rank, trainer.world_size
        others = [r for r in range(world) if r != me]
        who = f"rank {others[0]}" if len(others) == 1 else "another rank"
        sys.stderr.write(f"hmrnn: error: {who} of {world} stopped during training (killed or crashed; its own output "
                         f"may say why), so rank {me} cannot go on; {self.resume_hint(trainer)}\n")
        sys.stderr.flush()
        if os.environ.get("HMRNN_DEBUG") == "1":
            return  # Lightning re-raises: the traceback follows
        os._exit(1)

    @staticmethod
    def resume_hint(trainer: pl.Trainer) -> str:
        from hmrnn_lightning.run_folder import run_folder

        run = run_folder(trainer)
        if run is not None and (run / "checkpoints" / "last.ckpt").is_file():
            return f"resume with: hmrnn fit --resume {run}"
        return "resume the run's folder with: hmrnn fit --resume RUN"
