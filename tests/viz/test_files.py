"""Figures: the format the extension names, atomic and readable files, aligned panels, a legend, titled strokes."""

from __future__ import annotations

import os

import numpy as np
import pytest

from hmrnn_lightning.viz import FigureFormatError, boundary_figure, plot_boundaries, plot_strokes

MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "pdf": b"%PDF-", "svg": b"<?xml", "jpg": b"\xff\xd8\xff"}


def _inputs(text="the cat sat"):
    z = np.zeros((len(text), 3))
    z[[3, 7], 0] = 1
    return text, z, np.random.rand(len(text), 3)


@pytest.mark.parametrize("ext", sorted(MAGIC))
def test_extension_picks_the_format(tmp_path, ext):
    path = plot_boundaries(*_inputs(), tmp_path / f"fig.{ext}")
    assert path.read_bytes().startswith(MAGIC[ext])
    assert not [p for p in tmp_path.iterdir() if p.name != f"fig.{ext}"]  # no temporary file left


def test_unknown_extension_is_refused_before_writing(tmp_path):
    with pytest.raises(FigureFormatError, match=r"fig\.docx: extension \.docx; figures can be written as .*\.pdf"):
        plot_boundaries(*_inputs(), tmp_path / "fig.docx")
    with pytest.raises(FigureFormatError, match="no extension"):
        plot_boundaries(*_inputs(), tmp_path / "fig")
    assert not list(tmp_path.iterdir())


def test_files_are_readable_by_others_under_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = plot_boundaries(*_inputs(), tmp_path / "fig.png")
        assert path.stat().st_mode & 0o777 == 0o644  # mkstemp alone gives 0600
        os.umask(0o077)
        private = plot_boundaries(*_inputs(), tmp_path / "private.png")
        assert private.stat().st_mode & 0o777 == 0o600  # a private umask is respected
    finally:
        os.umask(old)


def test_boundary_rows_line_up_with_the_heatmap_and_have_a_legend():
    text, z, h = _inputs("a longer line of text to draw")
    fig = boundary_figure(text, z, h, title="t")
    fig.canvas.draw()
    ax_z, ax_h = fig.axes[0], fig.axes[1]
    pz, ph = ax_z.get_position(), ax_h.get_position()
    assert pz.x0 == pytest.approx(ph.x0) and pz.x1 == pytest.approx(ph.x1)  # same width: columns over characters
    assert ax_z.get_xlim() == pytest.approx((-0.5, len(text) - 0.5))
    assert ax_h.get_xlim() == pytest.approx((-0.5, len(text) - 0.5))
    assert len(ax_h.get_xticks()) == len(text)
    labels = [t.get_text() for t in ax_z.get_legend().get_texts()]
    assert labels == ["boundary (z = 1)", "no boundary (z = 0)"]
    black = ax_z.get_legend().legend_handles[0].get_facecolor()[:3]
    assert black == (0.0, 0.0, 0.0)
    # the black cells of the image are exactly the boundaries
    img = ax_z.get_images()[0].get_array()
    assert np.array_equal((np.asarray(img)[0] == 0).all(axis=-1), z[:, 0] == 1)  # RGB: black is (0, 0, 0)


def test_strokes_carry_their_title(tmp_path):
    offsets = np.zeros((20, 3))
    offsets[:, 0] = 1.0
    offsets[[9, 19], 2] = 1
    path = plot_strokes(offsets, tmp_path / "s.svg", title="ckpt: 20 points, bias 0.5, seed 3")
    assert "20 points, bias 0.5, seed 3" in path.read_text()
