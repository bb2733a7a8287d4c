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

from torch import Tensor
from torch.utils.data import IterableDataset


def batchify(ids: Tensor, rows: int) -> Tensor:
    """``[rows, N // rows]``: row ``i`` is the ``i``-th contiguous slice of ``ids``."""
    if ids.dim() != 1:
        raise ValueError(f"batchify: expected a 1-d tensor of symbol ids, got shape {tuple(ids.shape)}")
    length = ids.numel() // rows
    if length < 2:
        raise ValueError(f"batchify: {ids.numel()} symbols cannot make {rows} streams of at least 2 symbols")
    return ids[: rows * length].view(rows, length)


class StreamWindows(IterableDataset):
    """Yields ``(inputs, targets)`` windows ``[streams, seq_len]`` in order.

    An IterableDataset, so Lightning never wraps it in a (shuffling) distributed sampler.

    Args:
        ids: the whole split as a 1-d tensor of symbol ids.
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

    def __len__(self) -> int:
        usable = self.data.shape[1] - 1
        return usable // self.seq_len if self.drop_last else math.ceil(usable / self.seq_len)

    def __iter__(self):
        for k in range(len(self)):
            start = k * self.seq_len
            stop = min(start + self.seq_len, self.data.shape[1] - 1)
            window = (self.data[:, start:stop], self.data[:, start + 1 : stop + 1])
            yield window if self.labels is None else window + (self.labels[:, start:stop],)
