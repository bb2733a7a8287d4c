"""Pictures: boundaries and hidden-state norms (the paper's Figures 3 and 4)."""

from hmrnn_lightning.viz.boundaries import plot_boundaries

__all__ = ["plot_boundaries"]
