"""Writing figures: the format the file name says, atomically, readable as any file the user makes."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

#: file formats matplotlib's Agg canvas writes, by extension (``raw``/``rgba`` left out: headerless pixels)
FORMATS = ("png", "pdf", "svg", "svgz", "eps", "ps", "jpg", "jpeg", "tif", "tiff", "webp", "gif", "avif", "pgf")


class FigureFormatError(ValueError):
    """A figure file name whose extension names no format we can write."""


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only; no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_format(path: str | Path) -> str:
    """The format named by ``path``'s extension; :class:`FigureFormatError` when there is none
    or it is not one of :data:`FORMATS`. Commands call it before any work, to fail early."""
    ext = Path(path).suffix.lower().lstrip(".")
    if ext not in FORMATS:
        shown = f"extension .{ext}" if ext else "no extension"
        raise FigureFormatError(f"{path}: {shown}; figures can be written as {', '.join('.' + f for f in FORMATS)}")
    return ext


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Write ``fig`` in the format of ``path``'s extension, through a temporary file renamed
    into place (no half-written file), with the permissions the umask gives new files
    (``mkstemp`` alone would leave them private to the user)."""
    plt = pyplot()
    path = Path(path)
    try:
        fmt = figure_format(path)
    except FigureFormatError:
        plt.close(fig)
        raise
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".{fmt}", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi, format=fmt)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it; set back at once
    os.umask(mask)
    return mask
