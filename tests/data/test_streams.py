"""Contiguous streams, DDP partitioning, and the cache."""

import numpy as np
import pytest
import torch

from hmrnn_lightning.data import StreamWindows, TextDataModule
from hmrnn_lightning.data.base import DataError


def test_windows_are_contiguous_across_batches():
    ids = torch.arange(1003)
    windows = list(StreamWindows(ids, streams=4, seq_len=30))
    rows = torch.cat([x for x, _ in windows], dim=1)
    targets = torch.cat([y for _, y in windows], dim=1)
    assert torch.equal(rows, ids[:1000].view(4, 250)[:, :249])
    assert torch.equal(targets, ids[:1000].view(4, 250)[:, 1:])
    assert [x.shape[1] for x, _ in windows] == [30] * 8 + [9]
    assert len(list(StreamWindows(ids, 4, 30, drop_last=True))) == 8


def test_ddp_ranks_get_disjoint_contiguous_streams():
    ids = torch.arange(4000)
    seen = []
    for rank in range(2):
        ds = StreamWindows(ids, streams=3, seq_len=50, rank=rank, world_size=2)
        x = torch.cat([w[0] for w in ds], 1)
        assert (x[:, 1:] - x[:, :-1]).eq(1).all()  # contiguous within each stream
        seen.append(set(x.flatten().tolist()))
    assert not seen[0] & seen[1]
    assert len(StreamWindows(ids, 3, 50, 0, 2)) == len(StreamWindows(ids, 3, 50, 1, 2))


def test_labels_travel_with_their_symbols():
    ids = torch.arange(200)
    labels = (ids % 7 == 0).to(torch.uint8).unsqueeze(-1)
    for x, _, lab in StreamWindows(ids, 2, 15, labels=labels):
        assert torch.equal(lab[..., 0].bool(), x % 7 == 0)


def _dm(tmp_path, text, **kw):
    f = tmp_path / "corpus.txt"
    f.write_bytes(text if isinstance(text, bytes) else text.encode())
    return TextDataModule(str(f), cache_dir=str(tmp_path / "cache"), **kw)


def test_text_module_split_vocab_and_unknown_symbols(tmp_path):
    with pytest.warns(UserWarning, match="never occur in the training split"):
        dm = _dm(tmp_path, "abcab " * 300 + "xyz", batch_size=2, seq_len=10, split=[0.9, 0.05, 0.05])
        dm.setup()
    assert dm.vocab.symbols[:4] == [" ", "a", "b", "c"] and dm.vocab.unk in dm.vocab.symbols
    total = sum(dm.split_ids(s).numel() for s in ("train", "valid", "test"))
    assert total == 1803
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 10) and torch.equal(x[:, 1:], y[:, :-1])
    cache_files = sorted(p.name for p in dm.cache_path.iterdir())
    assert cache_files == ["meta.json", "test.npy", "train.npy", "valid.npy", "vocab.json"]
    assert isinstance(np.load(dm.cache_path / "train.npy", mmap_mode="r"), np.memmap)


def test_bad_text_input(tmp_path):
    with pytest.raises(DataError, match="empty"):
        _dm(tmp_path, "").setup()
    with pytest.raises(DataError, match="not valid utf-8"):
        _dm(tmp_path, b"ok \xff\xfe bad" * 10).setup()
    with pytest.raises(DataError, match="file not found"):
        TextDataModule(str(tmp_path / "none.txt"), cache_dir=str(tmp_path)).setup()
    dm = _dm(tmp_path, "abcdefgh " * 20, batch_size=4, seq_len=500)
    with pytest.raises(DataError, match="seq_len 500 is longer"):
        dm.train_dataloader()
    assert not list((tmp_path / "cache").glob("*.tmp-*"))


@pytest.mark.parametrize("encoding", ["rot13", "base64", "zip", "klingon"])
def test_encoding_that_cannot_decode_text_is_refused_when_configured(encoding, tmp_path):
    with pytest.raises(ValueError, match=rf"encoding '{encoding}' is (unknown|a Python codec but not a text encoding); give a text encoding"):
        TextDataModule(str(tmp_path / "a.txt"), encoding=encoding)
    TextDataModule(str(tmp_path / "a.txt"), encoding="bytes")  # byte values, no codec
    TextDataModule(str(tmp_path / "a.txt"), encoding="Latin-1")  # any spelling Python accepts


def test_zip_given_as_text_says_so(tmp_path):
    import zipfile

    with zipfile.ZipFile(tmp_path / "corpus.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("corpus.txt", "abc " * 500)
    data = (tmp_path / "corpus.zip").read_bytes()
    (tmp_path / "corpus.zip").write_bytes(data[: len(data) // 2])  # a download cut short
    with pytest.raises(DataError, match=r"corpus.zip is not valid utf-8 text \(byte \d+: .*\); it is a zip archive"):
        TextDataModule(str(tmp_path / "corpus.zip"), cache_dir=str(tmp_path / "c")).setup()
    with pytest.raises(DataError, match=r"corpus.zip is a truncated zip archive"):
        TextDataModule(str(tmp_path / "corpus.zip"), encoding="bytes", cache_dir=str(tmp_path / "c")).setup()
