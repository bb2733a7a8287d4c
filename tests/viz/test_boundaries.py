import numpy as np
import pytest

from hmrnn_lightning.cli import main
from hmrnn_lightning.viz import plot_boundaries


def test_plot_writes_a_png(tmp_path):
    text = "the cat sat"
    z = np.zeros((len(text), 3))
    z[[3, 7], 0] = 1
    path = plot_boundaries(text, z, np.random.rand(len(text), 3), tmp_path / "fig.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 2000
    with pytest.raises(ValueError, match="characters"):
        plot_boundaries("ab", z, z, tmp_path / "bad.png")


def test_plot_command_from_checkpoint(tmp_path):
    from tests.test_cli import tiny
    from hmrnn_lightning.cli import HMRNNCLI

    HMRNNCLI(args=["fit", *tiny(tmp_path, "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1")])
    ckpt = next(tmp_path.rglob("last.ckpt"))
    assert list(tmp_path.rglob("boundaries/epoch0000.png"))  # the callback drew one at validation
    out = tmp_path / "cmd.png"
    assert main(["plot-boundaries", f"--ckpt_path={ckpt}", "--text", "abc def", f"--out={out}"]) == 0
    assert out.stat().st_size > 2000
