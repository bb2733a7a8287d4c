"""Tiny configs on the synthetic corpus for the command tests (seconds per run on a CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest

TRAINER = """
trainer:
  max_epochs: 1
  accelerator: cpu
  enable_progress_bar: false
  enable_model_summary: false
  logger: false
  callbacks:
{callbacks}
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{monitor: val/bpc, mode: min, save_last: true}}
"""
DATA = """
data:
  class_path: hmrnn_lightning.data.SyntheticDataModule
  init_args: {{num_chars: 6000, batch_size: 4, seq_len: 20, cache_dir: {cache}}}
"""
MODEL = """
{trainer}
model:
  class_path: hmrnn_lightning.models.HMRNNLanguageModel
  init_args:
    embedding_dim: 8
    stack:
{stack}
    head:
      class_path: hmrnn_lightning.heads.SoftmaxHead
      init_args: {{embed_dim: 16}}
{data}
"""
HM_STACK = """      class_path: hmrnn_lightning.cells.HMStack
      init_args:
        hidden_sizes: [16, 16, 16]
        cell: hm_lstm
        layer_norm: true
        estimator: {class_path: hmrnn_lightning.estimators.StepEstimator}"""
LSTM_STACK = """      class_path: hmrnn_lightning.cells.LSTMStack
      init_args: {hidden_sizes: [16, 16, 16], layer_norm: true}"""


def write_tiny_configs(folder: Path) -> tuple[Path, Path]:
    """``(hm_config, lstm_config)`` paths: 3 x 16 LayerNorm HM-LSTM with slope annealing and
    BoundaryPlot, and a 3 x 16 LayerNorm LSTM, both on 6000 synthetic characters."""
    tmp_path = Path(folder)
    data = DATA.format(cache=tmp_path / "cache")
    hm_callbacks = ("    - class_path: hmrnn_lightning.callbacks.SlopeAnnealing\n      init_args: {a_max: 5.0, rate: 0.5}\n"
                    "    - class_path: hmrnn_lightning.callbacks.BoundaryPlot")
    hm = tmp_path / "hm.yaml"
    hm.write_text("seed_everything: 0" + MODEL.format(trainer=TRAINER.format(callbacks=hm_callbacks), stack=HM_STACK, data=data))
    lstm = tmp_path / "lstm.yaml"
    lstm.write_text(MODEL.format(trainer=TRAINER.format(callbacks=""), stack=LSTM_STACK, data=data))
    return hm, lstm


@pytest.fixture
def tiny_configs(tmp_path):
    return write_tiny_configs(tmp_path)


@pytest.fixture(scope="package")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A language-model checkpoint from two training steps of the tiny HM-LSTM (made once)."""
    from hmrnn_lightning.cli import HMRNNCLI

    folder = tmp_path_factory.mktemp("tiny_ckpt")
    hm, _ = write_tiny_configs(folder)
    HMRNNCLI(args=["fit", "--config", str(hm), f"--trainer.default_root_dir={folder}", "--trainer.max_steps=2",
                   "--trainer.limit_val_batches=1"])
    return next(folder.rglob("last.ckpt"))
