"""Checkpoint reading: each unusable file is one CheckpointError naming the file and the fault."""

import functools
import os

import pytest
import torch

from hmrnn_lightning import HMStack, StepEstimator
from hmrnn_lightning.checkpoints import CheckpointError, load_checkpoint, load_model
from hmrnn_lightning.heads import MixtureDensityHead
from hmrnn_lightning.models import HandwritingModel, HMRNNLanguageModel


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo this must never run",))


def _handwriting_ckpt(path):
    model = HandwritingModel(
        stack=functools.partial(HMStack, hidden_sizes=[4, 4], estimator=StepEstimator()),
        head=functools.partial(MixtureDensityHead, num_components=2, embed_dim=4),
    )
    # what LightningCLI records: the class path among the hyperparameters
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": {"_class_path": "hmrnn_lightning.models.HandwritingModel"}}, path)
    return path


def test_real_checkpoint_loads(lm_ckpt):
    ckpt = load_checkpoint(lm_ckpt, HMRNNLanguageModel)
    assert "embedding.weight" in ckpt["state_dict"]
    model = load_model(lm_ckpt, HMRNNLanguageModel)
    assert isinstance(model, HMRNNLanguageModel) and model.vocab and not model.training


def _broken_files(tmp_path, lm_ckpt):
    good = lm_ckpt.read_bytes()
    files = {
        "missing": (tmp_path / "missing.ckpt", "no such file"),
        "empty": (tmp_path / "empty.ckpt", "empty"),
        "truncated": (tmp_path / "truncated.ckpt", "truncated or corrupt"),
        "random": (tmp_path / "random.ckpt", "not a PyTorch checkpoint"),
        "folder": (tmp_path / "folder.ckpt", "is a folder"),
        "code": (tmp_path / "code.ckpt", "refused by the safe loader"),
        "tensor": (tmp_path / "tensor.ckpt", "not a Lightning checkpoint"),
        "nonfinite": (tmp_path / "nan.ckpt", "NaN or infinite"),
        "handwriting": (tmp_path / "hw.ckpt", "holds a handwriting model (HandwritingModel) where a language model"),
    }
    files["empty"][0].write_bytes(b"")
    files["truncated"][0].write_bytes(good[: len(good) // 2])
    files["random"][0].write_bytes(bytes(range(256)) * 8)
    files["folder"][0].mkdir()
    torch.save({"state_dict": {}, "payload": _RunsCode()}, files["code"][0])
    torch.save(torch.zeros(3), files["tensor"][0])
    state = torch.load(lm_ckpt, map_location="cpu", weights_only=True)
    state["state_dict"]["embedding.weight"][0, 0] = float("nan")
    torch.save(state, files["nonfinite"][0])
    _handwriting_ckpt(files["handwriting"][0])
    return files


def test_each_broken_file_is_one_named_error(tmp_path, lm_ckpt, capfd):
    for name, (path, reason) in _broken_files(tmp_path, lm_ckpt).items():
        with pytest.raises(CheckpointError) as exc:
            load_model(path, HMRNNLanguageModel)
        msg = str(exc.value)
        assert str(path) in msg and reason in msg, (name, msg)
        assert "\n" not in msg, (name, msg)
        assert "weights_only=False" not in msg and "weights_only` set to `False" not in msg  # never advise turning it off
    assert "must never run" not in capfd.readouterr().out


def test_language_checkpoint_where_handwriting_is_needed(lm_ckpt):
    with pytest.raises(CheckpointError, match="holds a language model .* where a handwriting model"):
        load_model(lm_ckpt, HandwritingModel)


def test_checkpoint_without_class_path_checked_by_hyperparameters(tmp_path, lm_ckpt):
    state = torch.load(lm_ckpt, map_location="cpu", weights_only=True)
    del state["hyper_parameters"]["_class_path"]
    path = tmp_path / "plain.ckpt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="vocab_size.* are not those of a handwriting model"):
        load_checkpoint(path, HandwritingModel)
    assert load_checkpoint(path, HMRNNLanguageModel)["state_dict"]
