"""PTB on the real files in ../shared/data/ptb (skipped where that folder is absent)."""

import torch

from hmrnn_lightning.data import PTBDataModule


def test_real_ptb_splits_and_vocabulary(shared_data, tmp_path):
    dm = PTBDataModule(str(shared_data / "ptb"), cache_dir=str(tmp_path))
    assert dm.vocab_size == 50 and "\n" in dm.vocab.symbols and "_" in dm.vocab.symbols
    lengths = {s: dm.split_ids(s).numel() for s in ("train", "valid", "test")}
    assert lengths == {"train": 5_017_482, "valid": 393_042, "test": 442_423}
    assert dm.vocab.decode(dm.split_ids("train")[:20]) == "aer_banknote_berlitz"
    assert dm.vocab.decode(dm.split_ids("valid")[:18]) == "consumers_may_want"
    assert dm.vocab.decode(dm.split_ids("test")[:27]) == "no_it_was_n't_black_monday\n"
    words = PTBDataModule(str(shared_data / "ptb"), source="word", cache_dir=str(tmp_path))
    for split in ("train", "valid", "test"):
        assert torch.equal(words.split_ids(split), dm.split_ids(split))
    labels = dm.boundary_labels("valid")[:18, 0].tolist()
    assert [i for i, v in enumerate(labels) if v] == [9, 13]  # the '_' after "consumers" and "may"
    assert not list(tmp_path.glob("*.tmp-*"))  # nothing half-written left behind
