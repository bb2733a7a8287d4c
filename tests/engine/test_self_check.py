"""The Triton backend's self-check on first use (``-k self_check``), under Triton's interpreter."""

import copy

import pytest
import torch

from hmrnn_lightning import HMStack, StepEstimator
from hmrnn_lightning.engine import kernels, self_check, triton_window

pytest.importorskip("triton")
if not triton_window.interpreting():  # HMRNN_TEST_CUDA=1 leaves the interpreter off; these run CPU tensors
    pytest.skip("the self-check tests run the kernels under TRITON_INTERPRET=1", allow_module_level=True)


@pytest.fixture
def fresh_checks(monkeypatch):
    """An empty record of checks, so that each test's first call checks again."""
    monkeypatch.setattr(self_check, "RESULTS", {})


def stacks(layer_norm=False):
    torch.manual_seed(0)
    fast = HMStack(5, [8, 6], StepEstimator(), layer_norm=layer_norm, impl="triton")
    cpu = copy.deepcopy(fast)
    cpu.impl = "sequence"
    return fast, cpu


def test_self_check_passes_silently_and_runs_once(fresh_checks, recwarn):
    fast, _ = stacks()
    x = torch.randn(3, 4, 5)
    fast(x)
    fast(x)
    assert list(self_check.RESULTS.values()) == [None]
    assert not [w for w in recwarn if "self-check" in str(w.message)]


def test_self_check_falls_back_on_a_planted_mismatch(fresh_checks, monkeypatch):
    """A kernel that gets a rule wrong (here: the top layer's z) is caught before the first
    window; the stack then runs the sequence path and says why, once."""
    monkeypatch.setattr(triton_window, "TOP_LAYER_Z", 0.5)
    fast, cpu = stacks(layer_norm=True)
    x = torch.randn(3, 4, 5)
    assert fast.active_impl("cpu") == "triton"
    with pytest.warns(UserWarning, match="self-check on cpu.*differs from the sequence path"):
        out = fast(x)
    assert fast.active_impl("cpu") == "sequence"  # what runs now, as logs and `hmrnn` report it
    assert stacks(layer_norm=False)[0].active_impl("cpu") == "triton"  # another layout: not checked yet
    torch.testing.assert_close(out.hidden[1], cpu(x).hidden[1], rtol=0, atol=0)
    out.hidden[1].sum().backward()  # the fallback trains
    key, = self_check.RESULTS
    assert "differs" in self_check.RESULTS[key]


def test_self_check_falls_back_when_the_kernels_fail(fresh_checks, monkeypatch):
    class Broken:
        def __getitem__(self, grid):
            def launch(**kwargs):
                raise RuntimeError("PTX assembly failed (planted)")
            return launch

    monkeypatch.setattr(kernels, "step_forward", Broken())
    fast, cpu = stacks()
    x = torch.randn(3, 4, 5)
    with pytest.warns(UserWarning, match="failed to run: RuntimeError: PTX assembly failed"):
        out = fast(x)
    torch.testing.assert_close(out.boundaries, cpu(x).boundaries)
    with torch.no_grad():
        fast.step(x[:, 0])  # sampling falls back too, without a second warning
