"""Pictures: boundaries and hidden-state norms (Figures 3-4), handwriting and its segments (Figure 5)."""

from hmrnn_lightning.viz.boundaries import boundary_figure, plot_boundaries
from hmrnn_lightning.viz.files import FigureFormatError, figure_format, save_figure
from hmrnn_lightning.viz.handwriting import plot_segments, plot_strokes, segment_ids

__all__ = [
    "FigureFormatError", "boundary_figure", "figure_format", "plot_boundaries", "plot_segments", "plot_strokes",
    "save_figure", "segment_ids",
]
