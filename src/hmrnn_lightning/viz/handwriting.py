"""Handwriting pictures: strokes, and the paper's Figure 5 (segments from pen-ups vs from boundaries)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hmrnn_lightning.viz.files import pyplot as _pyplot, save_figure


def _absolute(offsets: np.ndarray) -> np.ndarray:
    xy = np.cumsum(offsets[:, :2], axis=0)
    xy[:, 1] = -xy[:, 1]  # the database's y grows downward
    return xy


def _draw(ax, xy: np.ndarray, pen: np.ndarray, segment: np.ndarray | None) -> None:
    """Lines between consecutive points, broken after each pen-up; coloured by ``segment`` id."""
    import matplotlib

    colours = matplotlib.colormaps["tab10"]
    start = 0
    for t in range(len(xy)):
        if pen[t] > 0.5 or t == len(xy) - 1:
            part = slice(start, t + 1)
            if segment is None:
                ax.plot(xy[part, 0], xy[part, 1], "k-", linewidth=1)
            else:
                for k in range(start, t):  # each piece in the colour of its segment
                    ax.plot(xy[k : k + 2, 0], xy[k : k + 2, 1], "-", linewidth=1.2, color=colours(int(segment[k + 1]) % 10))
            start = t + 1
    ax.set_aspect("equal")
    ax.axis("off")


def plot_strokes(offsets: np.ndarray, path: str | Path, title: str | None = None) -> Path:
    """Draw ``(dx, dy, pen)`` offsets as pen strokes, in the format of ``path``'s extension,
    with ``title`` (e.g. the sampling parameters) above."""
    plt = _pyplot()
    if offsets.ndim != 2 or offsets.shape[1] != 3:
        raise ValueError(f"plot_strokes: expected [points, 3] offsets, got {offsets.shape}")
    xy = _absolute(offsets)
    span = np.ptp(xy, axis=0) + 1e-6
    fig, ax = plt.subplots(figsize=(min(16, max(4, 8 * span[0] / max(span[1], 1e-6) / 3)), 2.6))
    _draw(ax, xy, offsets[:, 2], None)
    if title:
        ax.set_title(title)
    return save_figure(fig, path)


def segment_ids(ends: np.ndarray) -> np.ndarray:
    """Segment number of every step: a new segment starts after each 1 in ``ends``."""
    ends = np.asarray(ends).astype(bool)
    return np.concatenate([[0], np.cumsum(ends[:-1])])


def plot_segments(offsets: np.ndarray, boundaries: np.ndarray, path: str | Path, layer: int = 2) -> Path:
    """Figure 5: the line drawn twice, coloured by pen-up segments and by layer ``layer``'s boundaries.

    Args:
        offsets: ``[points, 3]`` real offsets of one line.
        boundaries: ``[points, layers]`` boundaries the model produced for it.
        layer: which layer's boundaries colour the second drawing (1-based; the paper uses 2); one
            above the highest layer with a detector draws that layer.
    """
    if layer < 1:
        raise ValueError(f"plot_segments: layer counts from 1, got {layer}")
    plt = _pyplot()
    xy = _absolute(offsets)
    layer = min(layer, boundaries.shape[1] - 1) if boundaries.shape[1] > 1 else 1
    fig, (a, b) = plt.subplots(2, 1, figsize=(12, 5))
    _draw(a, xy, offsets[:, 2], segment_ids(offsets[:, 2]))
    a.set_title("segments from pen-up (ground truth)")
    _draw(b, xy, offsets[:, 2], segment_ids(boundaries[:, layer - 1]))
    b.set_title(f"segments from boundaries of layer {layer}")
    fig.tight_layout()
    return save_figure(fig, path)
