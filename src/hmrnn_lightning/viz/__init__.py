"""Pictures: boundaries and hidden-state norms (Figures 3-4), handwriting and its segments (Figure 5)."""

from hmrnn_lightning.viz.boundaries import plot_boundaries
from hmrnn_lightning.viz.handwriting import plot_segments, plot_strokes, segment_ids

__all__ = ["plot_boundaries", "plot_segments", "plot_strokes", "segment_ids"]
