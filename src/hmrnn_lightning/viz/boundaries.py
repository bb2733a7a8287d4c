"""The paper's Figures 3 and 4: boundaries per layer, and the l2 norm of each layer's h."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hmrnn_lightning.viz.files import pyplot, save_figure

__all__ = ["boundary_figure", "plot_boundaries", "save_figure"]

#: how a step's symbol is shown on the x axis
SHOWN = {" ": "␣", "\n": "⏎", "\t": "⇥"}


def boundary_figure(text: str, z: np.ndarray, h_norm: np.ndarray, title: str | None = None,
                    gold: dict[str, np.ndarray] | None = None):
    """The figure of :func:`plot_boundaries`, not yet written (for tests and notebooks).

    Layout: a 2 x 2 grid whose right column is narrow; the colour bar of the heat map sits in
    it, so the boundary rows and the heat map share one width and their columns line up with
    the characters below. Black blocks are boundaries (``z = 1``), as the legend says; the
    known boundaries (``gold``), when given, are red rows under the model's, one per level.
    """
    plt = pyplot()
    from matplotlib.patches import Patch

    T = len(text)
    if z.shape[0] != T or h_norm.shape[0] != T:
        raise ValueError(f"plot_boundaries: text has {T} characters but z has {z.shape[0]} and h_norm {h_norm.shape[0]} steps")
    gold = {level: np.asarray(marks) for level, marks in (gold or {}).items()}
    for level, marks in gold.items():
        if marks.shape[0] != T:
            raise ValueError(f"plot_boundaries: text has {T} characters but the {level!r} boundaries have {marks.shape[0]}")
    detectors = max(z.shape[1] - 1, 1)
    rows = detectors + len(gold)
    layers = h_norm.shape[1]
    fig = plt.figure(figsize=(max(6.0, 0.16 * T + 1.2), 0.45 * (rows + layers) + 2.0))
    grid = fig.add_gridspec(2, 2, height_ratios=[rows, layers], width_ratios=[1, 0.015], hspace=0.08, wspace=0.02)
    ax_z = fig.add_subplot(grid[0, 0])
    ax_h = fig.add_subplot(grid[1, 0], sharex=ax_z)
    fig.add_subplot(grid[0, 1]).axis("off")  # keeps the z row as wide as the heat map
    # one RGB image: the model's rows black on white, the known boundaries red on white
    image = np.ones((rows, T, 3))
    image[:detectors] -= np.asarray(z[:, :detectors], dtype=float).T[..., None]
    for k, marks in enumerate(gold.values()):
        image[detectors + k, marks > 0.5] = (0.8, 0.1, 0.1)
    ax_z.imshow(image, aspect="auto", interpolation="nearest", extent=(-0.5, T - 0.5, rows - 0.5, -0.5))
    ax_z.set_yticks(range(rows), [f"z{l + 1}" for l in range(detectors)] + list(gold))
    ax_z.tick_params(axis="x", labelbottom=False)
    handles = [Patch(facecolor="black", label="boundary (z = 1)"),
               Patch(facecolor="white", edgecolor="0.5", label="no boundary (z = 0)")]
    if gold:
        handles.append(Patch(facecolor=(0.8, 0.1, 0.1), label="known boundary"))
    ax_z.legend(handles=handles, loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=3, frameon=False, fontsize=8)
    im = ax_h.imshow(h_norm.T, aspect="auto", cmap="viridis", interpolation="nearest", extent=(-0.5, T - 0.5, layers - 0.5, -0.5))
    ax_h.set_yticks(range(layers), [f"|h{l + 1}|" for l in range(layers)])
    ax_h.set_xticks(range(T), [SHOWN.get(c, c) for c in text], fontsize=7, family="monospace")
    ax_h.set_xlim(-0.5, T - 0.5)
    fig.colorbar(im, cax=fig.add_subplot(grid[1, 1]), label="‖h‖")
    if title:
        fig.suptitle(title)
    return fig


def plot_boundaries(
    text: str, z: np.ndarray, h_norm: np.ndarray, path: str | Path, title: str | None = None,
    gold: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write the figure: characters along x; one row of black (boundary) / white blocks per
    layer's ``z`` (Fig. 3), then a heat map of ``||h^l_t||`` per layer (Fig. 4).

    Args:
        text: the characters, one per step.
        z: ``[time, layers]`` boundary states (the top layer's column, always 0, is left out).
        h_norm: ``[time, layers]`` l2 norms of the hidden states.
        path: output file; its extension picks the format (``.png``, ``.pdf``, ``.svg``...);
            written to a temporary name and renamed.
        title: drawn above the figure.
        gold: known boundaries to draw under the model's, ``{level: [time] 0/1}`` (the
            synthetic corpus's word, phrase and sentence ends, say).
    """
    from hmrnn_lightning.viz.files import figure_format

    figure_format(path)  # an unknown extension fails before any drawing
    return save_figure(boundary_figure(text, z, h_norm, title, gold), path)
