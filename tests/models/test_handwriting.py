"""Handwriting model: likelihood rises on CPU; the CLI trains it; the picture commands draw."""

import functools

import pytest
import torch

from hmrnn_lightning import HMStack, StepEstimator
from hmrnn_lightning.cli import HMRNNCLI, main
from hmrnn_lightning.data.iam import IAMOnDBDataModule
from hmrnn_lightning.heads import MixtureDensityHead
from hmrnn_lightning.models import HandwritingModel
from tests.helpers import write_iam_tree


def test_log_likelihood_rises_over_a_few_dozen_steps(tmp_path):
    write_iam_tree(tmp_path, n_lines=20)
    dm = IAMOnDBDataModule(str(tmp_path), min_length=60, max_length=80, batch_size=8, cache_dir=str(tmp_path / "c"))
    with pytest.warns(UserWarning):
        dm.setup()
    torch.manual_seed(0)
    model = HandwritingModel(
        stack=functools.partial(HMStack, hidden_sizes=[24, 24], estimator=StepEstimator()),
        head=functools.partial(MixtureDensityHead, num_components=3, embed_dim=16), lr=0.01, stats=dm.stats,
    )
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    batch = next(iter(dm.train_dataloader()))
    model.log = lambda *a, **k: None
    losses = []
    for _ in range(40):
        loss = model.training_step(batch, 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, (losses[0], losses[-1])  # per-step NLL in nats
    sample = model.generate(length=30)
    assert sample.shape == (30, 3) and set(sample[:, 2].tolist()) <= {0.0, 1.0}


def test_cli_fit_and_picture_commands(tmp_path):
    write_iam_tree(tmp_path, n_lines=30)
    args = [
        "fit", "--config", "configs/iam_hmlstm_anneal.yaml", f"--data.init_args.data_dir={tmp_path}",
        "--data.init_args.min_length=60", "--data.init_args.max_length=70", "--data.init_args.batch_size=4",
        "--model.init_args.stack.init_args.hidden_sizes=[8, 8, 8]",
        "--model.init_args.head.init_args.num_components=2", "--model.init_args.head.init_args.embed_dim=8",
        f"--trainer.default_root_dir={tmp_path / 'run'}", "--trainer.max_epochs=1", "--trainer.limit_train_batches=2",
        "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu",
    ]
    with pytest.warns(UserWarning):
        cli = HMRNNCLI(args=args)
    assert cli.model.stats == cli.datamodule.stats  # linked from the data
    assert "val/loglik" in cli.trainer.callback_metrics
    assert list((tmp_path / "run").rglob("handwriting/sample_epoch0000.png"))
    assert list((tmp_path / "run").rglob("handwriting/segments_epoch0000.png"))
    ckpt = next((tmp_path / "run").rglob("last.ckpt"))
    out = tmp_path / "s.png"
    assert main(["sample-strokes", f"--ckpt_path={ckpt}", "--length=50", f"--out={out}", "--seed=0"]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG" and out.stat().st_size > 1000
    seg = tmp_path / "f5.png"
    assert main(["plot-segments", f"--ckpt_path={ckpt}", f"--data_dir={tmp_path}", "--min_length=60", f"--out={seg}"]) == 0
    assert seg.stat().st_size > 1000
    for layer in ("0", "3"):  # 3 layers: detectors on 1 and 2 (5 was drawn as 2, 0 as the top layer)
        with pytest.raises(SystemExit) as stop:
            main(["plot-segments", f"--ckpt_path={ckpt}", f"--data_dir={tmp_path}", "--min_length=60",
                  f"--out={tmp_path / 'x.png'}", f"--layer={layer}"])
        assert stop.value.code == 2
    assert not (tmp_path / "x.png").exists()
