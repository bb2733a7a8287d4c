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


def _zipped(text: str) -> bytes:
    import io

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("text8", text)
    return buf.getvalue()


def test_binary_file_as_text8_names_the_file_and_the_byte(tmp_path):
    (tmp_path / "text8").write_bytes(b"the cat sat " * 40 + b"\x89PNG\r\n" + b"more " * 40)
    dm = Text8DataModule(str(tmp_path), split_sizes=[300, 50, 50], cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match=rf"{tmp_path / 'text8'} is not Text8: byte 480 is 0x89, not ASCII text"):
        dm.setup()
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").iterdir())  # nothing cached


@pytest.mark.parametrize("module", [Text8DataModule, Enwik8DataModule])
def test_truncated_zip_is_named_not_read_as_the_corpus(module, tmp_path):
    """A download cut short: zipfile does not see an archive (its end is missing), so without a
    check text8 failed to decode and enwik8 read the compressed bytes as the corpus."""
    data = _zipped("the quick brown fox " * 400)
    (tmp_path / f"{module.name}.zip").write_bytes(data[: len(data) // 2])
    dm = module(str(tmp_path), split_sizes=[300, 50, 50], cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match=rf"{tmp_path / module.name}.zip is a truncated zip archive.*download it again"):
        dm.setup()


def test_zip_with_a_damaged_member_is_named(tmp_path):
    text = "the quick brown fox " * 400
    data = bytearray(_zipped(text))
    data[60] ^= 0xFF  # inside the compressed member: the archive's end is whole, its CRC is not
    (tmp_path / "text8.zip").write_bytes(bytes(data))
    dm = Text8DataModule(str(tmp_path), split_sizes=[300, 50, 50], cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match=rf"{tmp_path / 'text8.zip'} is a damaged zip archive"):
        dm.setup()
