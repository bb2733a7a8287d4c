"""The picture commands: the format --out names, one-line errors, titled stroke samples."""

from __future__ import annotations

import functools

import pytest

from hmrnn_lightning.cli import main


def test_plot_boundaries_writes_a_pdf_when_asked(tiny_checkpoint, tmp_path):
    out = tmp_path / "fig.pdf"
    assert main(["plot-boundaries", f"--ckpt_path={tiny_checkpoint}", "--text", "ab cd ef", f"--out={out}"]) == 0
    assert out.read_bytes()[:5] == b"%PDF-"
    assert out.stat().st_mode & 0o044 == 0o044  # readable by others under the usual umask


def test_unknown_figure_extension_is_one_line(tiny_checkpoint, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["plot-boundaries", f"--ckpt_path={tiny_checkpoint}", "--text", "ab", f"--out={tmp_path / 'fig.docx'}"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"hmrnn: error: --out {tmp_path / 'fig.docx'}: extension .docx;")
    assert not list(tmp_path.glob("*.docx"))


def test_sample_strokes_title_names_the_parameters(tmp_path, monkeypatch):
    from hmrnn_lightning import HMStack, StepEstimator
    from hmrnn_lightning.commands import plots
    from hmrnn_lightning.heads import MixtureDensityHead
    from hmrnn_lightning.models import HandwritingModel

    model = HandwritingModel(
        stack=functools.partial(HMStack, hidden_sizes=[8, 8], estimator=StepEstimator()),
        head=functools.partial(MixtureDensityHead, num_components=2, embed_dim=8),
    )
    monkeypatch.setattr(plots, "load_model", lambda path, cls: model)  # no IAM-OnDB needed to draw a sample
    out = tmp_path / "s.svg"
    assert main(["sample-strokes", f"--ckpt_path={tmp_path / 'hw.ckpt'}", "--length=30", "--bias=0.7", "--seed=3",
                 f"--out={out}"]) == 0
    assert "hw.ckpt: 30 points, bias 0.7, seed 3" in out.read_text()
