"""The hub path with a stand-in for ``datasets``: offline mode is left to it, failures are one DataError."""

from __future__ import annotations

import sys
import types

import pytest

from hmrnn_lightning.data import PTBDataModule, Text8DataModule
from hmrnn_lightning.data.base import DataError


def fake_datasets(monkeypatch, splits=None, error=None):
    calls = []

    def load_dataset(name, config=None):
        calls.append((name, config))
        if error is not None:
            raise error
        return splits

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


def test_offline_with_a_cached_copy_loads_it(tmp_path, monkeypatch):
    """Offline, ``datasets`` can still serve a copy it cached before: we must ask it rather than refuse."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    rows = {"train": {"text": ["abc " * 100]}}
    calls = fake_datasets(monkeypatch, rows)
    dm = Text8DataModule(str(tmp_path / "absent"), split_sizes=[300, 50, 50], cache_dir=str(tmp_path / "c"))
    assert dm.vocab.decode(dm.split_ids("train")[:8]) == "abc abc "
    assert calls == [("afmck/text8", None)]


def test_ptb_from_the_hub_is_converted_to_char_symbols(tmp_path, monkeypatch):
    rows = {s: {"sentence": ["the cat sat", "a dog"] * 20} for s in ("train", "validation", "test")}
    fake_datasets(monkeypatch, rows)
    dm = PTBDataModule(str(tmp_path / "absent"), cache_dir=str(tmp_path / "c"), batch_size=2, seq_len=5)
    assert dm.vocab.decode(dm.split_ids("valid")[:18]) == "the_cat_sat\na_dog\n"


def test_offline_without_a_copy_says_where_to_put_the_files(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    fake_datasets(monkeypatch, error=ConnectionError("Couldn't reach 'afmck/text8' on the Hub (offline mode)"))
    with pytest.raises(DataError, match=r"hub is off .*no cached copy.*put text8 or text8.zip in") as exc:
        Text8DataModule(str(tmp_path / "absent"), cache_dir=str(tmp_path / "c")).setup()
    assert "\n" not in str(exc.value)


def test_missing_datasets_package_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as when it is not installed
    with pytest.raises(DataError, match=r"hmrnn-lightning\[hub\].*put text8"):
        Text8DataModule(str(tmp_path / "absent"), cache_dir=str(tmp_path / "c")).setup()


def test_a_hub_dataset_without_a_split_is_an_error(tmp_path, monkeypatch):
    fake_datasets(monkeypatch, {"train": {"sentence": ["a b"]}})
    with pytest.raises(DataError, match="has no 'validation' split"):
        PTBDataModule(str(tmp_path / "absent"), cache_dir=str(tmp_path / "c")).setup()
