"""IAM-OnDB: the parser on real files, and the datamodule on a small generated lineStrokes tree."""

import numpy as np
import pytest
import torch

from hmrnn_lightning.data.base import DataError
from tests.helpers import write_iam_tree
from hmrnn_lightning.data.iam import IAMOnDBDataModule, iter_line_files, parse_line_strokes, read_lines, to_offsets


def test_parser_reads_real_files(shared_data):
    archive = shared_data / "iam-ondb" / "lineStrokes-all.tar.xz"
    first = {}
    for line_id, data in iter_line_files(archive):
        first[line_id] = parse_line_strokes(data)
        if len(first) == 3:
            break
    pts = first["a01-000u-01"]
    assert pts.shape == (568, 3)  # 568 <Point> elements in 31 <Stroke> elements
    assert pts[:, 2].sum() == 31 and pts[-1, 2] == 1
    assert pts[0, :2].tolist() == [1073.0, 1058.0]
    off = to_offsets(pts)
    assert off[0, :2].tolist() == [0.0, 0.0] and off[1, :2].tolist() == [-1.0, 27.0]


def test_bad_files_are_skipped_with_one_warning(tmp_path):
    write_iam_tree(tmp_path, n_lines=4)
    with pytest.warns(UserWarning, match="skipped 1 XML files that do not parse and 1 with no points"):
        lines, skipped = read_lines(tmp_path / "lineStrokes")
    assert len(lines) == 4 and skipped == {"unparseable": 1, "no points": 1}
    with pytest.raises(DataError, match="not found"):
        IAMOnDBDataModule(str(tmp_path / "nowhere")).setup()


def test_datamodule_split_normalisation_and_masks(tmp_path):
    write_iam_tree(tmp_path, n_lines=40)
    dm = IAMOnDBDataModule(str(tmp_path), min_length=60, batch_size=4, cache_dir=str(tmp_path / "cache"))
    with pytest.warns(UserWarning, match="skipped"):
        dm.setup()
    sizes = {s: len(dm.sequences(s)) for s in ("train", "valid", "test")}
    kept = sum(sizes.values())
    assert sizes["train"] == int(0.9 * kept) and sizes["valid"] == int(0.05 * kept)
    assert all(len(a) >= 60 for s in sizes for a in dm.sequences(s))
    train = torch.cat([dm.dataset("train")[k][1][:, :2] for k in range(sizes["train"])])
    assert torch.allclose(train.mean(0), torch.zeros(2), atol=0.02) and torch.allclose(train.std(0), torch.ones(2), atol=0.02)
    inputs, targets, mask = next(iter(dm.train_dataloader()))
    assert inputs.shape == targets.shape and inputs.shape[-1] == 3
    lengths = mask.sum(1)
    assert (mask[torch.arange(4), lengths.long() - 1] == 1).all() and torch.equal(targets[:, :-1][mask[:, 1:] > 0], inputs[:, 1:][mask[:, 1:] > 0])
    again = IAMOnDBDataModule(str(tmp_path), min_length=60, batch_size=4, cache_dir=str(tmp_path / "cache"))
    again.setup()  # from the cache, same split
    assert again.line_ids("test") == dm.line_ids("test")


def test_real_database_paper_and_official_splits(shared_data, tmp_path):
    """The whole real archive (about a minute to parse): the paper's counts and mean length."""
    dm = IAMOnDBDataModule(str(shared_data / "iam-ondb"), split="paper", cache_dir=str(tmp_path))
    dm.setup()
    sizes = [len(dm.sequences(s)) for s in ("train", "valid", "test")]
    assert sizes == [10465, 581, 582]  # the paper: 10,465 / 581 / 582
    lengths = [len(a) for s in ("train", "valid", "test") for a in dm.sequences(s)]
    assert abs(np.mean(lengths) - 648) < 1  # the paper: mean length 648
    official = IAMOnDBDataModule(str(shared_data / "iam-ondb"), split="official", cache_dir=str(tmp_path))
    official.setup()  # same cache
    assert [len(official.sequences(s)) for s in ("train", "valid", "test")] == [5118, 1381, 1461]
    forms = {line.strip() for line in (shared_data / "iam-ondb" / "splits" / "testset_t.txt").read_text().split()}
    assert all(i.rsplit("-", 1)[0] in forms for i in official.line_ids("test"))


def test_bucket_sampler_resumes_mid_epoch_and_at_epoch_ends():
    from hmrnn_lightning.data.iam import BucketBatchSampler

    lengths = list(np.random.default_rng(1).integers(10, 100, size=23))
    straight = BucketBatchSampler(lengths, 4, shuffle=True, seed=3, bucket=2)
    epochs = [list(straight) for _ in range(3)]
    assert epochs[0] != epochs[1] and sorted(sum(epochs[0], [])) == list(range(23))
    for epoch in range(2):
        for stop in range(1, 7):  # 6 batches an epoch; stop == 6 is an epoch's end
            first = BucketBatchSampler(lengths, 4, shuffle=True, seed=3, bucket=2)
            for _ in range(epoch):
                list(first)
            it = iter(first)
            head = [next(it) for _ in range(stop)]
            resumed = BucketBatchSampler(lengths, 4, shuffle=True, seed=3, bucket=2)
            resumed.load_state_dict(first.state_dict())
            rest = list(resumed)
            assert head + rest == epochs[epoch] if stop < 6 else (head == epochs[epoch] and rest == epochs[epoch + 1])
    with pytest.raises(ValueError, match="drawn differently"):
        BucketBatchSampler(lengths[:-5], 4, shuffle=True, seed=3).load_state_dict(straight.state_dict())


def test_iam_training_resumes_mid_epoch_with_the_same_batches(tmp_path):
    """A handwriting run resumed from a mid-epoch checkpoint sees the batches the uninterrupted run saw."""
    import functools

    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    from hmrnn_lightning import HMStack, StepEstimator
    from hmrnn_lightning.heads.mdn import MixtureDensityHead
    from hmrnn_lightning.models.handwriting import HandwritingModel

    write_iam_tree(tmp_path, n_lines=40)

    def run(ckpt_path=None, callbacks=()):
        torch.manual_seed(0)
        dm = IAMOnDBDataModule(str(tmp_path), min_length=60, max_length=70, batch_size=4, cache_dir=str(tmp_path / "c"))
        model = HandwritingModel(
            stack=functools.partial(HMStack, hidden_sizes=[8, 8], estimator=StepEstimator()),
            head=functools.partial(MixtureDensityHead, num_components=2, embed_dim=8), stats=None,
        )
        seen = []

        class Record(pl.Callback):
            def on_train_batch_start(self, trainer, module, batch, batch_idx):
                seen.append((trainer.global_step, batch[0][:, 1, 0].tolist()))

        trainer = pl.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                             accelerator="cpu", num_sanity_val_steps=0, limit_val_batches=1,
                             callbacks=[Record(), *callbacks], default_root_dir=tmp_path)
        trainer.fit(model, dm, ckpt_path=ckpt_path, weights_only=False)  # our own file; hparams hold partials
        return seen

    with pytest.warns(UserWarning, match="skipped"):
        reference = run(callbacks=[ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=1, save_top_k=-1,
                                                   filename="{step}")])
    per_epoch = len(reference) // 2
    assert per_epoch >= 4 and reference[:per_epoch] != reference[per_epoch:]  # a new order each epoch
    for step in (2, per_epoch - 1, per_epoch):
        assert run(ckpt_path=tmp_path / "ck" / f"step={step}.ckpt") == reference[step:], f"resumed from step {step}"


def _cut(path):
    path.write_bytes(path.read_bytes()[:500])


def _flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the points, stored uncompressed: only the member's CRC-32 can tell
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_cut, _flip], ids=["truncated", "changed byte"])
def test_damaged_cache_file_is_rebuilt(damage, tmp_path, caplog):
    import logging
    import warnings

    write_iam_tree(tmp_path, n_lines=40)

    def module():
        return IAMOnDBDataModule(str(tmp_path), min_length=60, batch_size=4, cache_dir=str(tmp_path / "cache"))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the generated tree's deliberately bad files
        first = module()
        first.setup()
        damage(first.cache_path)
        caplog.set_level(logging.INFO)
        again = module()
        again.setup()
    said = [r.getMessage() for r in caplog.records if "is damaged (" in r.getMessage()]
    assert len(said) == 1 and str(first.cache_path) in said[0] and "rebuilding" in said[0], said
    assert again.line_ids("train") == first.line_ids("train")
    assert all(np.array_equal(a, b) for a, b in zip(again.sequences("train"), first.sequences("train")))
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.cache_path.name]  # no temporary file left
