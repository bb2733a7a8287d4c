"""hmrnn-lightning: Hierarchical Multiscale RNNs (Chung, Ahn & Bengio, ICLR 2017) for PyTorch Lightning.

The components below are imported on first use (``from hmrnn_lightning import HMStack``), so
that ``import hmrnn_lightning`` (and ``hmrnn --help``) does not load torch and Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

#: public name -> the module that defines it
_EXPORTS = {
    "SlopeAnnealing": "hmrnn_lightning.callbacks",
    "HMLSTMCell": "hmrnn_lightning.cells",
    "HMRNNCell": "hmrnn_lightning.cells",
    "HMStack": "hmrnn_lightning.cells",
    "LSTMStack": "hmrnn_lightning.cells",
    "BernoulliEstimator": "hmrnn_lightning.estimators",
    "ReinforceEstimator": "hmrnn_lightning.estimators",
    "SoftEstimator": "hmrnn_lightning.estimators",
    "StepEstimator": "hmrnn_lightning.estimators",
    "GatedOutputModule": "hmrnn_lightning.heads",
    "SoftmaxHead": "hmrnn_lightning.heads",
    "BitsPerCharacter": "hmrnn_lightning.metrics",
    "BoundaryStatistics": "hmrnn_lightning.metrics",
    "HMRNNLanguageModel": "hmrnn_lightning.models",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
