"""Bad input to the small commands is one line, checked before any work: output paths that cannot
be written, plot-boundaries' --text; --help shows the defaults."""

from __future__ import annotations

import pytest
import torch

from hmrnn_lightning.cli import main


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hmrnn: error: "), err
    return err[0]


def _outputs(tmp_path, tiny_configs):
    """Each command with an --out, the arguments it needs beside it, and whether --out is a folder.
    The checkpoint does not exist: an --out checked before any work fails first."""
    hm, lstm = tiny_configs
    ckpt = f"--ckpt_path={tmp_path / 'none.ckpt'}"
    text = tmp_path / "t.txt"
    text.write_text("ab\n")
    return {
        "predict": ([ckpt, f"--text={text}"], False),
        "plot-boundaries": ([ckpt, "--text=ab"], False),
        "sample-strokes": ([ckpt], False),
        "plot-segments": ([ckpt], False),
        "ablate": (["--base", str(hm)], True),
        "compare": (["--hm", str(hm), "--baseline", str(lstm)], True),
    }


@pytest.mark.parametrize("command", ["predict", "plot-boundaries", "sample-strokes", "plot-segments", "ablate", "compare"])
@pytest.mark.parametrize("where", ["under_a_file", "existing_other_kind"])
def test_unwritable_out_is_one_line_before_any_work(command, where, tmp_path, tiny_configs, capsys):
    args, is_folder = _outputs(tmp_path, tiny_configs)[command]
    afile = tmp_path / "afile"
    afile.write_text("a file\n")
    (tmp_path / "afolder.png").mkdir()
    if where == "under_a_file":
        out, expected = afile / ("x" if is_folder else "x.png"), f"{afile} is a file, not a folder"
    else:  # a folder where a file goes, a file where a folder goes
        out, expected = (afile, "is a file; give a folder") if is_folder else (tmp_path / "afolder.png", "is a folder; give a file name")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as exc:
        main([command, *args, f"--out={out}"])
    assert exc.value.code == 2
    line = _one_line(capsys)
    assert line.startswith(f"hmrnn: error: --out {out}") and expected in line, line
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written


@pytest.fixture(scope="module")
def accented_checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint with 'z' of its vocabulary renamed 'é', so a non-ASCII text is known to it."""
    ckpt = torch.load(tiny_checkpoint, map_location="cpu", weights_only=False)
    vocab = ["\u00e9" if s == "z" else s for s in ckpt["hmrnn_vocab"]]
    ckpt["hmrnn_vocab"] = ckpt["hyper_parameters"]["vocab"] = vocab
    path = tmp_path_factory.mktemp("accented") / "accented.ckpt"
    torch.save(ckpt, path)
    return path


def test_plot_boundaries_text_reaches_the_model_intact(accented_checkpoint, tmp_path, monkeypatch):
    import hmrnn_lightning.viz

    seen = []
    monkeypatch.setattr(hmrnn_lightning.viz, "plot_boundaries", lambda text, *a, **k: seen.append(text) or "fig.png")
    out = tmp_path / "f.png"
    assert main(["plot-boundaries", f"--ckpt_path={accented_checkpoint}", "--text", "caf\u00e9\\n", f"--out={out}"]) == 0
    assert seen == ["caf\u00e9\n"]  # the escape read, the accent kept (not 'cafÃ©')


@pytest.mark.parametrize("text, words", [
    ("ab\u4e2d", ["--text holds 1 symbol the model does not know: '\u4e2d'"]),
    ("", ["--text is empty"]),
    ("ab\\", ["--text", "cannot read its escapes", "\\ at end of string"]),
    ("ab\\x4", ["--text", "cannot read its escapes", "truncated"]),
])
def test_plot_boundaries_bad_text_is_one_line(text, words, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "f.png"
    with pytest.raises(SystemExit) as exc:
        main(["plot-boundaries", f"--ckpt_path={tiny_checkpoint}", "--text", text, f"--out={out}"])
    assert exc.value.code == 2
    line = _one_line(capsys)
    for word in words:
        assert word in line, line
    assert not out.exists()


@pytest.mark.parametrize("command, shown", [
    ("sample", ["(default: 200)", "(default: 1.0)", "(default: cpu)"]),
    ("predict", ["(default: 1000)", "(default: cpu)"]),
    ("plot-boundaries", ["(default: boundaries.png)"]),
    ("sample-strokes", ["(default: 700)", "(default: 0.5)", "(default: sample.png)"]),
    ("plot-segments", ["(default: valid)", "(default: 0)", "(default: 300)"]),
    ("ablate", ["(default: [0])", "(default: runs/ablation)"]),
    ("compare", ["(default: configs/ptb_step_anneal.yaml)", "(default: [0, 1, 2])", "(default: 40000)"]),
])
def test_help_shows_the_defaults(command, shown, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for default in shown:
        assert default in text, (default, text)
    assert "(default: None)" not in text and "(default: False)" not in text and "default: )" not in text
