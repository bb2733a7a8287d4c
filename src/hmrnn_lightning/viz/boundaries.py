"""The paper's Figures 3 and 4: boundaries per layer, and the l2 norm of each layer's h."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Write ``fig`` as PNG through a temporary file and a rename, so no half-written file is left."""
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def plot_boundaries(text: str, z: np.ndarray, h_norm: np.ndarray, path: str | Path, title: str | None = None) -> Path:
    """Write a PNG: characters along x; one row of white/black blocks per layer's ``z`` (Fig. 3),
    then a heat map of ``||h^l_t||`` per layer (Fig. 4).

    Args:
        text: the characters, one per step.
        z: ``[time, layers]`` boundary states (the top layer's column, always 0, is left out).
        h_norm: ``[time, layers]`` l2 norms of the hidden states.
        path: output file; written to a temporary name and renamed.
    """
    plt = _pyplot()
    T = len(text)
    if z.shape[0] != T or h_norm.shape[0] != T:
        raise ValueError(f"plot_boundaries: text has {T} characters but z has {z.shape[0]} and h_norm {h_norm.shape[0]} steps")
    detectors = max(z.shape[1] - 1, 1)
    layers = h_norm.shape[1]
    fig, (ax_z, ax_h) = plt.subplots(
        2, 1, figsize=(max(6, 0.16 * T), 0.45 * (detectors + layers) + 1.6), sharex=True,
        gridspec_kw={"height_ratios": [detectors, layers]},
    )
    ax_z.imshow(1 - z[:, :detectors].T, aspect="auto", cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax_z.set_yticks(range(detectors), [f"z{l + 1}" for l in range(detectors)])
    ax_z.set_ylim(detectors - 0.5, -0.5)
    im = ax_h.imshow(h_norm.T, aspect="auto", cmap="viridis", interpolation="nearest")
    ax_h.set_yticks(range(layers), [f"|h{l + 1}|" for l in range(layers)])
    ax_h.set_xticks(range(T), [{" ": "␣", "\n": "⏎"}.get(c, c) for c in text], fontsize=7, family="monospace")
    fig.colorbar(im, ax=ax_h, fraction=0.02, pad=0.01)
    if title:
        ax_z.set_title(title)
    fig.tight_layout()
    return save_figure(fig, path)
