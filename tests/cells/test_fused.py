"""The fused path gives the reference loop's outputs, boundaries and gradients."""

import copy

import pytest
import torch

from hmrnn_lightning import HMStack
from hmrnn_lightning.estimators import BernoulliEstimator, ReinforceEstimator, SoftEstimator, StepEstimator
from hmrnn_lightning.heads import SoftmaxHead

ESTIMATORS = [StepEstimator, BernoulliEstimator, SoftEstimator, ReinforceEstimator]


def run(stack, head, x, y, state, seed):
    torch.manual_seed(seed)
    out = stack(x, state)
    step_nll = head.nll(head(out.hidden), y)
    loss = step_nll.mean()
    aux = stack.estimator.auxiliary_loss(out, step_nll.detach())
    if aux is not None:
        loss = loss + aux
    stack.zero_grad()
    head.zero_grad()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in stack.named_parameters() if p.grad is not None}
    return out, loss.detach(), grads


def normwise(rel):
    """|a - b|_max <= rel * |a|_max: for tensors whose entries span many magnitudes."""

    def check(actual, expected, msg=None):
        err = (actual - expected).abs().max().item()
        assert err <= rel * expected.abs().max().item() + 1e-12, (msg, err, expected.abs().max().item())

    return check


def close(tol):
    def check(actual, expected, msg=None):
        torch.testing.assert_close(actual, expected, **tol, msg=(lambda m: f"{msg}: {m}") if msg else None)

    return check


def compare(estimator, layer_norm, dtype, check, device="cpu"):
    torch.manual_seed(0)
    ref = HMStack(6, [16, 12, 10], estimator(slope=2.0), layer_norm=layer_norm, impl="reference")
    with torch.no_grad():
        for cell in ref.cells:
            cell.bias[-1] = 0.3  # boundaries of both kinds early on
    head = SoftmaxHead([16, 12, 10], 9, 8)
    ref, head = ref.to(device, dtype), head.to(device, dtype)
    fast = copy.deepcopy(ref)
    fast.impl = "fused"
    x, y = torch.randn(5, 30, 6, dtype=dtype, device=device), torch.randint(0, 9, (5, 30), device=device)
    state = [s.detach() for s in ref(torch.randn(5, 7, 6, dtype=dtype, device=device)).state]  # non-zero start, some z = 1
    a, la, ga = run(ref, head, x, y, state, seed=1)
    b, lb, gb = run(fast, head, x, y, state, seed=1)
    if ref.estimator.discrete:
        assert torch.equal(a.boundaries, b.boundaries)
    else:
        check(b.boundaries, a.boundaries, "boundaries")
    assert 0 < a.boundaries[..., :2].mean() < 1
    for l, (ha, hb) in enumerate(zip(a.hidden, b.hidden)):
        check(hb, ha, f"h{l + 1}")
    check(b.operations, a.operations, "operations")
    check(lb, la, "loss")
    assert ga.keys() == gb.keys()
    for name in ga:
        check(gb[name], ga[name], name)


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("layer_norm", [False, True])
def test_fused_equals_reference_in_fp64(estimator, layer_norm):
    """Same arithmetic up to summation order: within 1e-9 of each tensor's largest entry."""
    compare(estimator, layer_norm, torch.float64, normwise(1e-9))


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=lambda c: c.__name__)
def test_fused_equals_reference_in_fp32(estimator):
    compare(estimator, False, torch.float32, close(dict(rtol=1e-5, atol=1e-6)))


@pytest.mark.parametrize("estimator", [StepEstimator, BernoulliEstimator], ids=lambda c: c.__name__)
def test_fused_layer_norm_fp32_same_boundaries(estimator):
    """With layer norm, LN(c) of a cell still near 0 divides by a tiny std, so fp32 rounding of
    the (differently ordered) sums, 6e-8 at the first step, grows over 30 steps, and gradients
    at initialisation reach 4e4; measured: every gradient off by the same 1.8e-4 of its largest
    entry. The fp64 test above shows the arithmetic is the same; here boundaries must agree
    exactly and values to 1e-3 of each tensor's largest entry."""
    compare(estimator, True, torch.float32, normwise(1e-3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (run with HMRNN_TEST_CUDA=1)")
@pytest.mark.parametrize("estimator", ESTIMATORS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("layer_norm", [False, True])
def test_fused_equals_reference_on_cuda(estimator, layer_norm):
    torch.backends.cuda.matmul.allow_tf32 = False
    compare(estimator, layer_norm, torch.float64, normwise(1e-9), device="cuda")
    if not layer_norm:
        compare(estimator, layer_norm, torch.float32, close(dict(rtol=1e-5, atol=1e-6)), device="cuda")


def test_auto_picks_fused_for_hm_lstm_only():
    assert HMStack(4, [5, 5], StepEstimator()).uses_fused()
    assert not HMStack(4, [5, 5], StepEstimator(), cell="hm_rnn").uses_fused()
    assert not HMStack(4, [5, 5], StepEstimator(), impl="reference").uses_fused()
    with pytest.raises(ValueError, match="HM-LSTM cells only"):
        HMStack(4, [5], StepEstimator(), cell="hm_rnn", impl="fused")
