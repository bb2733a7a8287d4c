"""hmrnn word-ends on two tiny checkpoints trained without separators."""

import json

import pytest
import torch

from hmrnn_lightning.cli import main
from hmrnn_lightning.data.synthetic import generate_corpus
from tests.commands.conftest import HM_STACK, LSTM_STACK, MODEL, TRAINER

DATA = """
data:
  class_path: hmrnn_lightning.data.TextDataModule
  init_args: {{train_file: {text}, remove_separators: true, batch_size: 4, seq_len: 20, cache_dir: {cache}}}
"""


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """``(hm.ckpt, lstm.ckpt, text file)``: two training steps each on synthetic words without spaces."""
    from hmrnn_lightning.cli import HMRNNCLI

    folder = tmp_path_factory.mktemp("word_ends")
    text = folder / "words.txt"
    text.write_text(generate_corpus(8000, seed=1).text)
    data = DATA.format(text=text, cache=folder / "cache")
    out = []
    for name, stack in (("hm", HM_STACK), ("lstm", LSTM_STACK)):
        config = folder / f"{name}.yaml"
        config.write_text("seed_everything: 0" + MODEL.format(trainer=TRAINER.format(callbacks=""), stack=stack, data=data))
        HMRNNCLI(args=["fit", "--config", str(config), f"--trainer.default_root_dir={folder / name}",
                       "--trainer.max_steps=2", "--trainer.limit_val_batches=1"])
        out.append(next((folder / name).rglob("last.ckpt")))
    return out[0], out[1], text


def test_word_ends_table_and_json(checkpoints, tmp_path, capsys):
    hm, lstm, text = checkpoints
    fit, test = tmp_path / "fit.txt", tmp_path / "test.txt"
    fit.write_text(text.read_text()[:3000])
    test.write_text(text.read_text()[3000:6000])
    code = main(["word-ends", "--hm_ckpt", str(hm), "--lstm_ckpt", str(lstm), "--text", str(test), "--fit_text", str(fit),
                 "--all_positions", "--out", str(tmp_path / "r.json")])
    printed = capsys.readouterr().out
    assert code == 0
    result = json.loads((tmp_path / "r.json").read_text())
    expected_words = sum(w != "" for w in test.read_text().replace("\n", " ").split(" ")[:-1])
    assert result["words"] == expected_words
    assert result["symbols"] == len(test.read_text().replace(" ", "").replace("\n", ""))
    assert len(result["hm"]) == 2 and len(result["baseline"]) == 2  # 3 layers, the top one without a detector
    for hm_row, base_row in zip(result["hm"], result["baseline"]):
        assert base_row["rate"] == pytest.approx(hm_row["rate"], abs=1 / result["symbols"])  # matched (all positions ranked)
    assert [len(result["probe"][m]) for m in ("hm", "lstm")] == [3, 3]
    assert "HM-LSTM z, layer 2" in printed and "LSTM surprisal ranks at layer 1's rate" in printed
    assert "linear probe, LSTM layer 3" in printed and "best HM layer:" in printed
    assert "HM-LSTM z, layer 1 read 1 later" in printed and "layer 2 fires on the symbols around" in printed
    assert len(result["hm_next"]) == 2 and set(result["offsets"][0]) == {"-2", "-1", "0", "+1", "+2"}


def test_word_ends_refuses_models_trained_with_separators(checkpoints, tmp_path, capsys):
    hm, lstm, text = checkpoints
    ckpt = torch.load(lstm, weights_only=False)
    ckpt["hmrnn_text"]["options"] = {}
    spaced = tmp_path / "spaced.ckpt"
    torch.save(ckpt, spaced)
    with pytest.raises(SystemExit) as exc:
        main(["word-ends", "--hm_ckpt", str(hm), "--lstm_ckpt", str(spaced), "--text", str(text)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "trained on text with separators" in err and "remove_separators true" in err
    with pytest.raises(SystemExit):
        main(["word-ends", "--hm_ckpt", str(lstm), "--lstm_ckpt", str(lstm), "--text", str(text)])
    assert "has no boundary detectors" in capsys.readouterr().err


def test_plot_boundaries_draws_the_known_word_ends_of_a_model_without_separators(checkpoints, tmp_path, monkeypatch):
    from hmrnn_lightning.viz import boundaries

    hm, _, _ = checkpoints
    drawn = {}
    real = boundaries.plot_boundaries

    def spy(text, z, h_norm, path, title=None, gold=None):
        drawn.update(text=text, gold=gold)
        return real(text, z, h_norm, path, title=title, gold=gold)

    monkeypatch.setattr("hmrnn_lightning.viz.plot_boundaries", spy)
    out = tmp_path / "fig.png"
    assert main(["plot-boundaries", f"--ckpt_path={hm}", "--text", "ab cd\nef\n", f"--out={out}"]) == 0
    assert out.stat().st_size > 0
    # the separators are taken out, and each word's last symbol before one is a known end
    assert drawn["text"] == "abcdef"
    assert drawn["gold"]["word end"].tolist() == [0, 1, 0, 1, 0, 1]


def test_the_table_says_when_the_baseline_has_too_few_peaks_for_a_layers_rate():
    from hmrnn_lightning.commands.word_ends import table

    def row(rate):
        return {"rate": rate, "precision": 0.5, "recall": 0.5, "f1": 0.5, "f1_tol1": 0.6}

    def result(base_rate):
        return {"baseline_name": "surprisal", "peaks_only": True, "text": "t.txt", "symbols": 1000, "words": 200,
                "gold_rate": 0.2, "hm": [row(0.569), row(0.2)], "baseline": [row(base_rate), row(0.2)],
                "hm_next": [row(0.569), row(0.2)], "baseline_next": [row(base_rate), row(0.2)], "offsets": []}

    short = table(result(0.340))
    assert "fire below the rate of layer 1:" in short and "--all_positions" in short
    assert "fire below the rate" not in table(result(0.569))
