import numpy as np
import pytest

from hmrnn_lightning.cli import main
from hmrnn_lightning.viz import plot_boundaries
from tests.helpers import tiny


def test_plot_writes_a_png(tmp_path):
    text = "the cat sat"
    z = np.zeros((len(text), 3))
    z[[3, 7], 0] = 1
    path = plot_boundaries(text, z, np.random.rand(len(text), 3), tmp_path / "fig.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 2000
    with pytest.raises(ValueError, match="characters"):
        plot_boundaries("ab", z, z, tmp_path / "bad.png")


def test_plot_command_from_checkpoint(tmp_path):
    from hmrnn_lightning.cli import HMRNNCLI

    HMRNNCLI(args=["fit", *tiny(tmp_path, "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1")])
    ckpt = next(tmp_path.rglob("last.ckpt"))
    assert [p.name for p in tmp_path.rglob("boundaries/*.png")] == ["epoch0000-step0000002.png"]  # drawn at validation
    out = tmp_path / "cmd.png"
    assert main(["plot-boundaries", f"--ckpt_path={ckpt}", "--text", "abc def", f"--out={out}"]) == 0
    assert out.stat().st_size > 2000


def test_no_boundary_picture_for_an_lstm(tmp_path):
    """The LSTM baseline has no boundaries: the callback draws nothing rather than empty panels."""
    from hmrnn_lightning.cli import HMRNNCLI

    HMRNNCLI(args=["fit", *tiny(tmp_path, "--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--trainer.val_check_interval=1",
                                "--model.init_args.stack=hmrnn_lightning.cells.LSTMStack",
                                "--model.init_args.stack.init_args.hidden_sizes=[12, 12]",
                                "--model.init_args.boundary_entropy_target=null")])
    assert list(tmp_path.rglob("last.ckpt")) and not list(tmp_path.rglob("boundaries/*.png"))


def test_known_boundaries_are_red_rows_under_the_models():
    from hmrnn_lightning.viz.boundaries import boundary_figure

    text = "ab cd."
    z = np.zeros((len(text), 3))
    z[2, 0] = 1
    gold = {"word": np.array([0, 0, 1, 0, 0, 1]), "sentence": np.array([0, 0, 0, 0, 0, 1])}
    fig = boundary_figure(text, z, np.random.rand(len(text), 3), gold=gold)
    ax_z = fig.axes[0]
    assert [t.get_text() for t in ax_z.get_yticklabels()] == ["z1", "z2", "word", "sentence"]
    image = ax_z.get_images()[0].get_array()
    assert image.shape[:2] == (4, len(text))
    assert tuple(image[2, 2]) == (0.8, 0.1, 0.1) and tuple(image[2, 1]) == (1.0, 1.0, 1.0)  # word end in red
    assert tuple(image[0, 2]) == (0.0, 0.0, 0.0) and tuple(image[3, 5]) == (0.8, 0.1, 0.1)
    with pytest.raises(ValueError, match="'word' boundaries have 2"):
        boundary_figure(text, z, np.random.rand(len(text), 3), gold={"word": np.array([0, 1])})
