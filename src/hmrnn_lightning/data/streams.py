"""Contiguous streams for stateful truncated BPTT.

A corpus of ``N`` symbol ids is cut into ``streams`` rows of equal length (the tail that
does not divide is dropped); window ``k`` is columns ``[k L, (k+1) L]`` of every row, with
targets shifted by one. Windows come in order, so the state carried from window ``k`` is
exactly the state the model needs at the start of window ``k + 1``.

Under DDP the corpus is cut into ``streams * world_size`` rows and rank ``r`` reads rows
``[r * streams, (r + 1) * streams)``: every rank sees its own contiguous text, and every
rank has the same number of windows.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

from torch import Tensor
from torch.utils.data import Dataset


def batchify(ids: Tensor, rows: int) -> Tensor:
    """``[rows, N // rows]``: row ``i`` is the ``i``-th contiguous slice of ``ids`` (a view, no copy)."""
    if ids.dim() != 1:
        raise ValueError(f"batchify: expected a 1-d tensor of symbol ids, got shape {tuple(ids.shape)}")
    length = ids.numel() // rows
    if length < 2:
        raise ValueError(f"batchify: {ids.numel()} symbols cannot make {rows} streams of at least 2 symbols")
    return ids[: rows * length].view(rows, length)


class StreamWindows(Dataset):
    """The windows ``(inputs, targets)`` of shape ``[streams, seq_len]``, in order; a sized,
    resumable iterable that a ``train_dataloader`` returns as is.

    Why not a ``DataLoader`` over an ``IterableDataset``: Lightning cannot resume such a loader
    mid-epoch (it warns, and replays the epoch from window 0), warns that an ``IterableDataset``
    has ``__len__``, and a loader adds nothing here, since a window is a slice of a tensor.
    Returned directly, this object is

    * sized, so Lightning knows the epoch length and does not prefetch: when a checkpoint is
      written after training step ``k``, exactly windows ``0..k`` have been handed out;
    * stateful (:meth:`state_dict` / :meth:`load_state_dict`), so Lightning stores the position
      in the checkpoint and a resumed run continues with window ``k + 1`` of the same epoch;
    * never wrapped in a distributed sampler, since it is not a ``DataLoader``: each rank
      already reads its own streams.

    It is also a map-style dataset (item ``k`` is window ``k``), so ``DataLoader(windows,
    batch_size=None)`` works too.

    Ids stay in their stored dtype (``uint8`` for vocabularies up to 256 symbols, memory-mapped
    from the cache); each window is converted to ``int64`` when it is served, so a process
    holds the corpus once, in its smallest form.

    Args:
        ids: the whole split as a 1-d tensor of symbol ids (any integer dtype).
        streams: rows per batch on this rank (the batch size).
        seq_len: window length (truncated-BPTT length).
        rank: this process's rank.
        world_size: number of processes.
        drop_last: drop a final window shorter than ``seq_len`` (training keeps shapes static).
        labels: optional ``[N, levels]`` known boundaries of every symbol; windows then come as
            ``(inputs, targets, labels_of_inputs)``.
    """

    def __init__(
        self, ids: Tensor, streams: int, seq_len: int, rank: int = 0, world_size: int = 1, drop_last: bool = False,
        labels: Tensor | None = None,
    ) -> None:
        super().__init__()
        if streams <= 0 or seq_len <= 0:
            raise ValueError(f"StreamWindows: batch size and seq_len must be positive, got {streams}, {seq_len}")
        if not 0 <= rank < world_size:
            raise ValueError(f"StreamWindows: rank {rank} outside world size {world_size}")
        rows = batchify(ids, streams * world_size)
        if rows.shape[1] - 1 < seq_len and drop_last:
            raise ValueError(
                f"StreamWindows: seq_len {seq_len} is longer than each of the {streams * world_size} streams "
                f"({rows.shape[1]} symbols from {ids.numel()}); use a smaller seq_len or batch size"
            )
        self.data = rows[rank * streams : (rank + 1) * streams]
        self.labels = None
        if labels is not None:
            n = rows.numel()
            lab = labels[:n].reshape(streams * world_size, rows.shape[1], -1)
            self.labels = lab[rank * streams : (rank + 1) * streams]
        self.seq_len = seq_len
        self.drop_last = drop_last
        self.rank, self.world_size = rank, world_size
        self._served = 0  # windows handed out by the running iterator
        self._resume_at = 0  # where the next iterator starts (set by load_state_dict)

    def __len__(self) -> int:
        usable = self.data.shape[1] - 1
        return usable // self.seq_len if self.drop_last else math.ceil(usable / self.seq_len)

    def __getitem__(self, k: int) -> tuple[Tensor, ...]:
        if not 0 <= k < len(self):
            raise IndexError(f"window {k} of {len(self)}")
        start = k * self.seq_len
        stop = min(start + self.seq_len, self.data.shape[1] - 1)
        window = (self.data[:, start:stop].long(), self.data[:, start + 1 : stop + 1].long())
        return window if self.labels is None else window + (self.labels[:, start:stop],)

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        start, self._resume_at = self._resume_at, 0  # a resume position serves one epoch only
        for k in range(start, len(self)):
            self._served = k + 1
            yield self[k]

    # -- resuming ------------------------------------------------------------------------------
    def _layout(self) -> dict[str, Any]:
        return {
            "windows": len(self), "streams": self.data.shape[0], "seq_len": self.seq_len,
            "stream_length": self.data.shape[1], "world_size": self.world_size,
        }

    def state_dict(self) -> dict[str, Any]:
        """The position in the epoch: windows handed out so far, and the layout they came from.

        A position equal to the epoch length means the epoch is done; the next one starts at 0.
        """
        return {"position": self._served % len(self), **self._layout()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Start the next epoch's iterator at the saved position.

        Raises:
            ValueError: the saved layout (batch size, seq_len, corpus length, devices) differs from
                this one, so the saved position would point at other text.
        """
        saved = {k: state.get(k) for k in self._layout()}
        if saved != self._layout():
            changed = ", ".join(f"{k} {saved[k]} -> {v}" for k, v in self._layout().items() if saved[k] != v)
            raise ValueError(
                f"the checkpoint's training windows were cut differently ({changed}); resume with the "
                f"batch size, seq_len, data and devices of the run that wrote it"
            )
        self._resume_at = int(state["position"])
        self._served = self._resume_at
