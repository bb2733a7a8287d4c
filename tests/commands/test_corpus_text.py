"""Text given to a PTB model is read as PTB's character files are: predict takes ptb.char.valid.txt
itself, sample's prime is written `t h e _`, and a plain-text prime is told how to write it."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from hmrnn_lightning.cli import main
from hmrnn_lightning.data.ptb import PTBDataModule, ptb_char_symbols
from hmrnn_lightning.models.language_model import HMRNNLanguageModel
from tests.commands.conftest import MODEL, TRAINER, HM_STACK

WORDS = "the cat sat on a mat and dog ran quick brown fox jumps over lazy big red hen who will eat my pie".split()


def _char_file(path: Path, sentences: int, rng: random.Random) -> None:
    """Sentences in Mikolov's character format: symbols separated by spaces, `_` between words."""
    lines = [" " + " _ ".join(" ".join(w) for w in rng.choices(WORDS, k=rng.randint(4, 9))) + " " for _ in range(sentences)]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def ptb_run(tmp_path_factory):
    """``(checkpoint, data folder)`` of two training steps on a tiny corpus in PTB's char format."""
    folder = tmp_path_factory.mktemp("ptb")
    rng = random.Random(0)
    for split, n in (("train", 120), ("valid", 20), ("test", 20)):
        _char_file(folder / f"ptb.char.{split}.txt", n, rng)
    data = (f"\ndata:\n  class_path: hmrnn_lightning.data.PTBDataModule\n  init_args: "
            f"{{data_dir: {folder}, batch_size: 4, seq_len: 20, cache_dir: {folder / 'cache'}}}\n")
    config = folder / "ptb.yaml"
    config.write_text(MODEL.format(trainer=TRAINER.format(callbacks=""), stack=HM_STACK, data=data))
    assert main(["fit", "--config", str(config), f"--trainer.default_root_dir={folder}", "--trainer.max_steps=2",
                 "--trainer.limit_val_batches=1"]) == 0
    return next(folder.rglob("last.ckpt")), folder


def test_the_checkpoint_says_how_its_data_wrote_text(ptb_run):
    model = HMRNNLanguageModel.load_from_checkpoint(ptb_run[0], map_location="cpu")
    assert model.text_reading == {"datamodule": "hmrnn_lightning.data.ptb.PTBDataModule", "options": {"source": "char"}}


def test_predict_reads_the_corpus_file_itself(ptb_run, tmp_path, capsys):
    ckpt, folder = ptb_run
    valid = folder / "ptb.char.valid.txt"
    out = tmp_path / "valid.tsv"
    assert main(["predict", f"--ckpt_path={ckpt}", f"--text={valid}", f"--out={out}"]) == 0
    rows = [line.split("\t") for line in out.read_text(encoding="utf-8").splitlines()[1:]]
    assert [r[1] for r in rows] == [s.replace("\n", "\\n") for s in ptb_char_symbols(valid.read_text())]  # as training read it
    assert f"{len(rows)} symbols" in capsys.readouterr().out


def test_sample_prime_in_the_corpus_format(ptb_run, capsys):
    assert main(["sample", f"--ckpt_path={ptb_run[0]}", "--prime", "t h e _ c a t _", "--length=10", "--seed=0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("the_cat_") and len(out) == len("the_cat_") + 10 + 1  # the prime's symbols, 10 more, a newline


def test_a_plain_text_prime_is_told_how_to_write_it(ptb_run, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["sample", f"--ckpt_path={ptb_run[0]}", "--prime", "the "])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hmrnn: error: --prime holds 1 symbol the model does not know: 'the'")
    assert "PTB's character files" in err[0] and "`_` for a space" in err[0] and "`t h e _ c a t`" in err[0]


@pytest.mark.parametrize("text, symbols", [
    ("t h e _", ["t", "h", "e", "_"]),  # a prime: no end of sentence added
    (" a b \n c \n \n", ["a", "b", "\n", "c", "\n"]),  # as the files: blank lines skipped
])
def test_ptb_text_to_symbols(text, symbols):
    assert PTBDataModule.text_to_symbols(text, source="char") == symbols
    assert PTBDataModule.text_to_symbols("the cat\n", source="word") == list("the_cat\n")
