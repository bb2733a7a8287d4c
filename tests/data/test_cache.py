"""The cache: its default place, read-only data folders, concurrent builders, keys that follow the files."""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from hmrnn_lightning.data import PTBDataModule, SyntheticDataModule, Text8DataModule
from hmrnn_lightning.data.base import DataError
from hmrnn_lightning.data.cache import CacheError, cache_root, publish_file

ROOT = Path(__file__).resolve().parents[2]


def test_default_cache_place_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("HMRNN_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "hmrnn-lightning"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "hmrnn-lightning"
    monkeypatch.setenv("HMRNN_CACHE_DIR", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(str(tmp_path / "arg")) == tmp_path / "arg"  # cache_dir wins
    dm = SyntheticDataModule(num_chars=2000, batch_size=2, seq_len=10)
    dm.setup()
    assert dm.cache_path.parent == tmp_path / "env" and (dm.cache_path / "meta.json").is_file()


def _read_only(path: Path) -> None:
    for p in [path, *path.rglob("*")]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def test_read_only_data_folder_works(tmp_path, monkeypatch):
    """chmod'ed read-only: for a normal user any write there fails; root ignores the mode, so
    the test also checks that nothing at all was written into the folder."""
    folder = tmp_path / "ptb"
    folder.mkdir()
    for split, n in (("train", 60), ("valid", 8), ("test", 8)):
        (folder / f"ptb.char.{split}.txt").write_text("t h e _ c a t _ s a t\n" * n)
    before = {p: p.stat().st_mtime_ns for p in [folder, *folder.rglob("*")]}
    _read_only(folder)
    monkeypatch.setenv("HMRNN_CACHE_DIR", str(tmp_path / "cache"))
    try:
        dm = PTBDataModule(str(folder), batch_size=2, seq_len=10)
        dm.setup()
        assert dm.vocab.decode(dm.split_ids("train")[:8]) == "the_cat_"
        assert next(iter(dm.train_dataloader()))[0].shape == (2, 10)
        assert {p: p.stat().st_mtime_ns for p in [folder, *folder.rglob("*")]} == before
        assert dm.cache_path.parent == tmp_path / "cache"
    finally:
        folder.chmod(0o755)


@pytest.mark.parametrize("kind", ["read-only folder", "a file in the way"])
def test_cache_place_that_cannot_be_written_is_one_clear_error(tmp_path, kind):
    if kind == "read-only folder":
        place = tmp_path / "locked"
        place.mkdir()
        _read_only(place)
        if os.access(place, os.W_OK):
            pytest.skip("root ignores folder permissions; the other case covers the error path")
    else:
        place = tmp_path / "file"
        place.write_text("not a folder")
    dm = SyntheticDataModule(num_chars=2000, batch_size=2, seq_len=10, cache_dir=str(place / "sub"))
    dm.read_splits = lambda: pytest.fail("the corpus was read before the cache place was checked")
    try:
        with pytest.raises(DataError, match=r"cannot write the data cache in .*(locked|file).*HMRNN_CACHE_DIR"):
            dm.setup()
    finally:
        place.chmod(0o755)


def test_windows_are_served_from_uint8_without_a_copy(tmp_path):
    dm = SyntheticDataModule(num_chars=5000, batch_size=4, seq_len=10, cache_dir=str(tmp_path))
    ids = dm.split_ids("train")
    assert ids.dtype == torch.uint8
    assert ids.data_ptr() == dm.split_ids("train").data_ptr()  # the same memory map, not a copy per call
    assert isinstance(dm._arrays["train"], np.memmap)
    windows = dm.train_dataloader()
    assert windows.data.dtype == torch.uint8 and windows.data.data_ptr() == ids.data_ptr()
    x, y = next(iter(windows))
    assert x.dtype == y.dtype == torch.int64
    assert torch.equal(x[0], ids[:10].long()) and torch.equal(y[0], ids[1:11].long())


def test_text8_cache_key_follows_the_file(tmp_path):
    (tmp_path / "text8").write_text("abc def " * 50)
    dm = Text8DataModule(str(tmp_path), split_sizes=[300, 50, 50], cache_dir=str(tmp_path / "c"))
    first = dm.cache_path
    assert dm.vocab.symbols == [" ", "a", "b", "c", "d", "e", "f"]
    (tmp_path / "text8").write_text("xyz uvw " * 50)  # replaced, same size
    os.utime(tmp_path / "text8", ns=(1, 1))
    again = Text8DataModule(str(tmp_path), split_sizes=[300, 50, 50], cache_dir=str(tmp_path / "c"))
    assert again.cache_path != first
    assert again.vocab.symbols == [" ", "u", "v", "w", "x", "y", "z"]


BUILD = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    import hmrnn_lightning.data.cache as cache
    from hmrnn_lightning.data import SyntheticDataModule

    folder = Path(sys.argv[1])
    rename = os.rename

    def rename_when_both_are_ready(src, dst):
        # hold the publishing rename until both processes have built their copy, so the two
        # renames race for certain, whatever the load on the machine
        (folder / f"ready-{os.getpid()}").touch()
        while len(list(folder.glob("ready-*"))) < 2:
            time.sleep(0.01)
        rename(src, dst)

    cache.os.rename = rename_when_both_are_ready
    dm = SyntheticDataModule(num_chars=50_000, batch_size=4, seq_len=10, cache_dir=sys.argv[2])
    dm.setup()
    print(dm.cache_path, int(dm.split_ids("train").long().sum()))
""")


@pytest.mark.slow
def test_two_processes_build_one_new_cache_at_once(tmp_path):
    sync, cache = tmp_path / "sync", tmp_path / "cache"
    sync.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", BUILD, str(sync), str(cache)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    assert len(list(sync.iterdir())) == 2  # both reached the rename: both built a copy
    assert outs[0][0] == outs[1][0]  # the same cache, the same content
    entries = sorted(p.name for p in cache.iterdir())
    assert len(entries) == 1 and entries[0].startswith("synthetic-")  # no temporary folder left behind
    whole = cache / entries[0]
    assert sorted(p.name for p in whole.iterdir()) == ["meta.json", "test.npy", "train.npy", "valid.npy", "vocab.json"]
    fresh = SyntheticDataModule(num_chars=50_000, batch_size=4, seq_len=10, cache_dir=str(tmp_path / "again"))
    for split in ("train", "valid", "test"):
        assert np.array_equal(np.load(whole / f"{split}.npy"), fresh.split_ids(split).numpy())


def test_str_names_the_module_without_building_loaders(tmp_path):
    dm = SyntheticDataModule(num_chars=2000, batch_size=2, seq_len=10, cache_dir=str(tmp_path))
    assert str(dm).startswith("SyntheticDataModule(batch_size=2, seq_len=10, cache=")
    assert not list(tmp_path.iterdir())  # nothing built to print it


# -- damaged entries ---------------------------------------------------------------------------------


def _truncate(entry: Path) -> None:
    with open(entry / "train.npy", "r+b") as f:
        f.truncate(1000)


def _flip_an_id(entry: Path) -> None:
    data = bytearray((entry / "valid.npy").read_bytes())
    data[-1] = 250  # past the header: a symbol id far outside the vocabulary, the size unchanged
    (entry / "valid.npy").write_bytes(bytes(data))


DAMAGE = {
    "truncated array": (_truncate, "train.npy is 1000 bytes"),
    "array deleted": (lambda e: (e / "test.npy").unlink(), "test.npy is missing"),
    "vocab not json": (lambda e: (e / "vocab.json").write_text("{not json"), "vocab.json"),
    "id out of range": (_flip_an_id, "valid.npy does not hold what was written"),
    "meta.json deleted": (lambda e: (e / "meta.json").unlink(), "meta.json is missing"),
}


@pytest.mark.parametrize("damage", list(DAMAGE), ids=list(DAMAGE))
def test_damaged_entry_is_rebuilt(damage, tmp_path, caplog):
    def module():
        return SyntheticDataModule(num_chars=3000, batch_size=2, seq_len=10, cache_dir=str(tmp_path))

    whole = module()
    whole.setup()
    expected = {s: whole.split_ids(s).numpy().copy() for s in ("train", "valid", "test")}
    del whole  # its memory maps close
    entry = module().cache_path
    harm, reason = DAMAGE[damage]
    harm(entry)
    caplog.set_level(logging.INFO)
    dm = module()
    dm.setup()
    said = [r.getMessage() for r in caplog.records if "is damaged (" in r.getMessage()]
    assert len(said) == 1 and str(entry) in said[0] and reason in said[0] and "rebuilding" in said[0], said
    for split, ids in expected.items():
        assert np.array_equal(dm.split_ids(split).numpy(), ids), split
    assert [p.name for p in tmp_path.iterdir()] == [entry.name]  # the damaged copy is gone, no leftovers
    caplog.clear()
    module().setup()  # the rebuilt entry is whole: opened without a word
    assert not [r for r in caplog.records if "is damaged (" in r.getMessage()]


def test_damaged_entry_that_cannot_be_rebuilt_names_the_folder(tmp_path, monkeypatch):
    dm = SyntheticDataModule(num_chars=3000, batch_size=2, seq_len=10, cache_dir=str(tmp_path))
    dm.prepare_data()
    _truncate(dm.cache_path)

    def source_gone(self):
        raise DataError("file not found: /data/gone.txt")

    monkeypatch.setattr(SyntheticDataModule, "read_splits", source_gone)
    again = SyntheticDataModule(num_chars=3000, batch_size=2, seq_len=10, cache_dir=str(tmp_path))
    with pytest.raises(DataError) as info:
        again.setup()
    message = str(info.value)
    assert str(dm.cache_path) in message and "damaged" in message and "delete that folder" in message, message
    assert "/data/gone.txt" in message  # and why it could not be rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [dm.cache_path.name]  # no temporary folder left


def _as_old_entry(entry: Path) -> None:
    """The entry as versions before the checksums wrote it: no ``files`` in meta.json."""
    meta = json.loads((entry / "meta.json").read_text())
    del meta["files"]
    (entry / "meta.json").write_text(json.dumps(meta))


def test_old_entry_without_checksums_is_kept_when_sound(tmp_path, monkeypatch):
    dm = SyntheticDataModule(num_chars=3000, batch_size=2, seq_len=10, cache_dir=str(tmp_path))
    dm.prepare_data()
    _as_old_entry(dm.cache_path)
    monkeypatch.setattr(SyntheticDataModule, "read_splits", lambda self: pytest.fail("a sound old entry was rebuilt"))
    again = SyntheticDataModule(num_chars=3000, batch_size=2, seq_len=10, cache_dir=str(tmp_path))
    assert again.vocab.decode(again.split_ids("train")[:40]) == dm.vocab.decode(dm.split_ids("train")[:40])


@pytest.mark.parametrize("damage", ["truncated array", "id out of range"])
def test_old_entry_without_checksums_is_checked_for_size_and_ids(damage, tmp_path):
    dm = SyntheticDataModule(num_chars=3000, batch_size=2, seq_len=10, cache_dir=str(tmp_path))
    dm.prepare_data()
    _as_old_entry(dm.cache_path)
    DAMAGE[damage][0](dm.cache_path)
    from hmrnn_lightning.data.base import entry_problem

    problem = entry_problem(dm.cache_path)
    assert problem is not None and ("header says" in problem if damage == "truncated array" else "outside its vocabulary" in problem)
    again = SyntheticDataModule(num_chars=3000, batch_size=2, seq_len=10, cache_dir=str(tmp_path))
    again.setup()
    assert int(again.split_ids("valid").max()) < again.vocab_size
    assert "files" in json.loads((again.cache_path / "meta.json").read_text())  # rebuilt in the new form


# -- a full disk ---------------------------------------------------------------------------------------


def _fills_the_disk(path, arr, *args, **kwargs):
    """np.save on a disk that fills up: part of the file is written, then ENOSPC."""
    with open(path, "wb") as f:
        f.write(b"\x93NUMPY partial")
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_while_building_is_one_clear_error_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(np, "save", _fills_the_disk)
    dm = SyntheticDataModule(num_chars=3000, batch_size=2, seq_len=10, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(CacheError) as info:
        dm.setup()
    message = str(info.value)
    assert f"no space left for the data cache in {tmp_path / 'cache'}" in message, message
    assert "--data.init_args.cache_dir" in message and "HMRNN_CACHE_DIR" in message
    assert list((tmp_path / "cache").iterdir()) == []  # the partial entry is removed


def test_full_disk_while_publishing_a_file_leaves_nothing(tmp_path):
    def write(tmp: Path) -> None:
        tmp.write_bytes(b"half an archive")
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    with pytest.raises(CacheError, match=r"no space left for the data cache in .*cache \(Disk quota exceeded\)"):
        publish_file(tmp_path / "cache" / "iam-lines.npz", write, suffix=".npz")
    assert list((tmp_path / "cache").iterdir()) == []


def test_other_write_errors_keep_their_traceback(tmp_path):
    """Only a full disk is the user's to fix by moving the cache; any other failure is not relabelled."""
    def write(tmp: Path) -> None:
        raise OSError(errno.EIO, "Input/output error")

    with pytest.raises(OSError) as info:
        publish_file(tmp_path / "x.npz", write)
    assert not isinstance(info.value, CacheError) and info.value.errno == errno.EIO
    assert list(tmp_path.iterdir()) == []
