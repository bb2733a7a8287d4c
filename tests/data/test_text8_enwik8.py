"""Text8 and enwik8 read from local plain or zipped files, split by position."""

import zipfile

import pytest

from hmrnn_lightning.data import Enwik8DataModule, Text8DataModule
from hmrnn_lightning.data.base import DataError


def test_text8_from_zip_split_by_count(tmp_path):
    text = ("the quick brown fox jumps over the lazy dog " * 40)[:1500]
    with zipfile.ZipFile(tmp_path / "text8.zip", "w") as zf:
        zf.writestr("text8", text)
    dm = Text8DataModule(str(tmp_path), split_sizes=[1000, 200, 300], cache_dir=str(tmp_path / "c"), batch_size=2, seq_len=10)
    assert dm.vocab.decode(dm.split_ids("valid")) == text[1000:1200]
    assert dm.vocab_size == len(set(text))  # closed vocabulary: no unknown symbol
    assert dm.boundary_labels("test")[:, 0].sum().item() == text[1200:1500].count(" ")


def test_enwik8_reads_bytes(tmp_path):
    data = ("<page>caf\u00e9 \u65e5\u672c</page>\n" * 30).encode("utf-8")
    (tmp_path / "enwik8").write_bytes(data)
    dm = Enwik8DataModule(str(tmp_path), split_sizes=[500, 100, 100], cache_dir=str(tmp_path / "c"))
    ids = dm.split_ids("train")
    assert ids.numel() == 500
    assert bytes(ord(c) for c in dm.vocab.decode(ids)) == data[:500]  # one symbol per byte


def test_short_corpus_is_an_error(tmp_path):
    with pytest.raises(DataError, match="fewer than"):
        (tmp_path / "text8").write_text("abc " * 10)
        Text8DataModule(str(tmp_path), cache_dir=str(tmp_path / "c2")).setup()
