"""Words without spaces: the separators leave the text, the gold word ends stay as labels on
each word's last symbol, and the windows (so the boundary metrics) serve those labels."""

import numpy as np
import pytest
import torch

from hmrnn_lightning.data import PTBDataModule, Text8DataModule, TextDataModule
from hmrnn_lightning.data.base import remove_word_separators


def test_remove_word_separators_known_answer():
    kept, ends = remove_word_separators("ab cd\n\nef g", (" ", "\n"))
    assert kept == "abcdefg"
    assert ends.tolist() == [0, 1, 0, 1, 0, 1, 0]  # a run of separators ends one word; the last word may go on
    kept, ends = remove_word_separators(["t", "o", "_", "b", "e", "\n"], ("_", "\n"))
    assert kept == ["t", "o", "b", "e"] and ends.tolist() == [0, 1, 0, 1]
    kept, ends = remove_word_separators("  ab", (" ",))
    assert kept == "ab" and ends.tolist() == [0, 0]  # separators before the first word end none


def write_ptb(folder):
    lines = {"train": ["a b _ c d", "e f _ a"] * 30, "valid": ["a _ b c", "d e f"] * 10, "test": ["c _ d _ e", "f a b"] * 10}
    for split, rows in lines.items():
        (folder / f"ptb.char.{split}.txt").write_text("\n".join(rows) + "\n")


def test_ptb_without_separators(tmp_path):
    write_ptb(tmp_path)
    dm = PTBDataModule(str(tmp_path), cache_dir=str(tmp_path / "c"), remove_separators=True, batch_size=2, seq_len=4)
    assert "_" not in dm.vocab.symbols and "\n" not in dm.vocab.symbols
    assert dm.vocab.decode(dm.split_ids("valid")[:12]) == "abcdefabcdef"
    labels = dm.boundary_labels("valid")[:12, 0].tolist()
    assert labels == [1, 0, 1, 0, 0, 1] * 2  # "a" "bc" "def": the last letter of each word
    assert dm.boundary_levels() == ["word"]
    with_sep = PTBDataModule(str(tmp_path), cache_dir=str(tmp_path / "c"), batch_size=2, seq_len=4)
    assert with_sep.cache_path != dm.cache_path and "_" in with_sep.vocab.symbols  # two entries side by side
    # the windows the validation loop reads carry the word-end labels, aligned with the inputs
    inputs, _, window_labels = next(iter(dm.val_dataloader()))
    assert torch.equal(window_labels[..., 0].long(), dm.boundary_labels("valid")[:, 0].view(2, -1)[:, :4].long())
    assert dm.text_options() == {"source": "char", "remove_separators": True}
    assert PTBDataModule.text_to_symbols("t h e _ c a t", **dm.text_options()) == list("thecat")
    assert PTBDataModule.text_to_symbols("t h e _ c a t", **with_sep.text_options()) == list("the_cat")


def test_text8_and_any_text_without_separators(tmp_path):
    text = ("the quick brown fox jumps over the lazy dog " * 40)[:1500]
    (tmp_path / "text8").write_text(text)
    dm = Text8DataModule(str(tmp_path), split_sizes=[1000, 200, 300], cache_dir=str(tmp_path / "c"), remove_separators=True)
    assert dm.vocab.decode(dm.split_ids("valid")) == text[1000:1200].replace(" ", "")
    words = text[1000:1200].split(" ")
    expected = np.concatenate([np.eye(len(w), dtype=int)[-1] for w in words[:-1]] + [np.zeros(len(words[-1]), int)])
    assert dm.boundary_labels("valid")[:, 0].tolist() == expected.tolist()
    (tmp_path / "any.txt").write_text("one two\nthree four five\n" * 50)
    anytext = TextDataModule(str(tmp_path / "any.txt"), cache_dir=str(tmp_path / "c"), remove_separators=True)
    assert " " not in anytext.vocab.symbols and "\n" not in anytext.vocab.symbols
    ids, labels = anytext.split_ids("train"), anytext.boundary_labels("train")[:, 0]
    assert anytext.vocab.decode(ids[:11]) == "onetwothree" and labels[:11].tolist() == [0, 0, 1, 0, 0, 1, 0, 0, 0, 0, 1]
    assert TextDataModule.text_to_symbols("a b\n", remove_separators=True) == ["a", "b"]


def test_a_split_of_separators_only_is_one_error(tmp_path):
    from hmrnn_lightning.data.base import DataError

    (tmp_path / "text8").write_text("ab cd ef" + " " * 20 + "gh ij")
    dm = Text8DataModule(str(tmp_path), split_sizes=[8, 20, 5], cache_dir=str(tmp_path / "c"), remove_separators=True)
    with pytest.raises(DataError, match="the valid split without its separators is empty"):
        dm.prepare_data()
