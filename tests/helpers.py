"""Small builders shared by tests."""

from __future__ import annotations

import functools

import torch

from hmrnn_lightning import HMRNNLanguageModel, HMStack, SoftmaxHead, StepEstimator
from hmrnn_lightning.cells.base import LayerState


def random_state(batch: int, hidden: int, z: float) -> LayerState:
    return LayerState(torch.randn(batch, hidden), torch.randn(batch, hidden), torch.full((batch,), float(z)))


def tiny_model(vocab_size: int = 11, hidden: int = 16, layers: int = 3, estimator=None, **kwargs) -> HMRNNLanguageModel:
    stack = functools.partial(HMStack, hidden_sizes=[hidden] * layers, estimator=estimator or StepEstimator())
    return HMRNNLanguageModel(
        vocab_size=vocab_size, stack=stack, head=functools.partial(SoftmaxHead, embed_dim=hidden),
        embedding_dim=kwargs.pop("embedding_dim", 8), **kwargs,
    )
