"""Tests of the example plugin: its estimator, and discovery through its entry point."""

import sys
from pathlib import Path

import pytest
import torch

PLUGIN_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PLUGIN_ROOT / "src"))

from hmrnn_gumbel import GumbelSigmoidEstimator  # noqa: E402


def test_binary_forward_and_relaxed_gradient():
    est = GumbelSigmoidEstimator(temperature=0.5)
    x = torch.randn(1000, requires_grad=True)
    z = est(x)
    assert set(z.unique().tolist()) <= {0.0, 1.0}
    z.sum().backward()
    # sigm' > 0, but it underflows to exactly 0 where a noise draw saturates the sigmoid
    assert (x.grad >= 0).all() and (x.grad > 0).float().mean() > 0.95


def test_sampling_rate_follows_the_logit():
    est = GumbelSigmoidEstimator()
    x = torch.full((40000,), 1.0)
    assert abs(est(x).mean().item() - torch.sigmoid(torch.tensor(1.0)).item()) < 0.02  # P(x + L > 0) = sigm(x)
    est.eval()
    assert est(x).eq(1).all()


def test_bad_temperature():
    with pytest.raises(ValueError, match="temperature"):
        GumbelSigmoidEstimator(temperature=0)


def test_found_through_its_entry_point_when_installed():
    """With the plugin installed (`pip install -e plugins/hmrnn-gumbel`, as CI does), hmrnn
    resolves the short name to the class through the entry point, not through this file's path."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution("hmrnn-gumbel")
    except PackageNotFoundError:
        pytest.skip("hmrnn-gumbel is not installed")
    from hmrnn_lightning.registry import available, resolve

    assert "gumbel" in available("estimators")
    assert resolve("estimators", "gumbel").__name__ == "GumbelSigmoidEstimator"
