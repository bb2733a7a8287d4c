"""The CPU fast path (``sequence``: hand-written backward over the whole sequence) gives the
reference loop's outputs, boundaries and gradients. The GPU path (``triton``) has its own
tests in ``test_triton_window.py``; both use ``tests.helpers.compare``."""

import copy

import pytest
import torch

from hmrnn_lightning import HMStack
from hmrnn_lightning.engine import cpu_fused
from hmrnn_lightning.estimators import BernoulliEstimator, ReinforceEstimator, SoftEstimator, StepEstimator
from hmrnn_lightning.heads import SoftmaxHead
from tests.helpers import close, compare, normwise, run_with_gradients

ESTIMATORS = [StepEstimator, BernoulliEstimator, SoftEstimator, ReinforceEstimator]


FAST = [("sequence", False), ("sequence", True)]  # (impl, layer norm)


def _pytorch_loop_for_bernoulli(estimator, monkeypatch) -> None:
    """Bernoulli through the sequence path's PyTorch loop, which draws per step as the reference
    does (the fused kernels draw the window at once: tests/engine/test_cpu_fused.py)."""
    if estimator is BernoulliEstimator:
        monkeypatch.setattr(cpu_fused, "ENABLED", False)


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("impl,layer_norm", FAST)
def test_fast_equals_reference_in_fp64(estimator, impl, layer_norm, monkeypatch):
    """Same arithmetic up to summation order: within 1e-9 of each tensor's largest entry."""
    _pytorch_loop_for_bernoulli(estimator, monkeypatch)
    compare(estimator, layer_norm, torch.float64, normwise(1e-9), impl=impl)


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("impl,layer_norm", FAST)
def test_fast_equals_reference_in_fp32(estimator, impl, layer_norm, monkeypatch):
    _pytorch_loop_for_bernoulli(estimator, monkeypatch)
    # layer norm rescales each gradient row by 1/std, so entrywise agreement is held relative to
    # each tensor's largest entry there
    check = normwise(1e-5) if layer_norm else close(dict(rtol=1e-5, atol=1e-6))
    compare(estimator, layer_norm, torch.float32, check, impl=impl)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "pytorch_loop"])
@pytest.mark.parametrize("layer_norm", [False, True])
def test_fast_equals_reference_without_flush_gradient(layer_norm, fused, monkeypatch):
    """``flush_gradient=False``: z_prev's gradient through the carry alone, on every CPU path."""
    monkeypatch.setattr(cpu_fused, "ENABLED", fused)
    compare(StepEstimator, layer_norm, torch.float64, normwise(1e-9), impl="sequence", flush_gradient=False)


@pytest.mark.parametrize("layer_norm", [False, True])
@pytest.mark.parametrize("estimator", [StepEstimator, ReinforceEstimator], ids=lambda c: c.__name__)
def test_sequence_with_the_task_loss_alone(estimator, layer_norm):
    """Without gradients on the boundary logits, rows in COPY have ds = 0 and the backward
    pass leaves them out of its products; the gradients must not change."""
    compare(estimator, layer_norm, torch.float64, normwise(1e-9), impl="sequence", all_outputs=False)


@pytest.mark.parametrize("layer_norm", [False, True])
@pytest.mark.parametrize("estimator", [StepEstimator, SoftEstimator], ids=lambda c: c.__name__)
def test_sequence_without_row_skipping_equals_reference(estimator, layer_norm, monkeypatch):
    """The dense variant of the sequence path (what a GPU runs) on CPU."""
    from hmrnn_lightning.engine import sequence

    monkeypatch.setattr(sequence, "SKIP_GATED_ROWS", False)
    compare(estimator, layer_norm, torch.float64, normwise(1e-9), impl="sequence")


@pytest.mark.parametrize("layer_norm", [False, True])
def test_sequence_inference_equals_reference(layer_norm):
    """Without gradients the sequence path keeps nothing and multiplies each gated term, the
    normalised bottom-up term included, for its open rows only."""
    torch.manual_seed(0)
    ref = HMStack(6, [16, 12, 10], StepEstimator(slope=2.0), layer_norm=layer_norm, impl="reference").double()
    fast = copy.deepcopy(ref)
    fast.impl = "sequence"
    x = torch.randn(5, 30, 6, dtype=torch.float64)
    with torch.no_grad():
        a, b = ref(x), fast(x)
    assert 0.1 < a.boundaries[..., :2].mean() < 0.9  # gates open on some rows, closed on others
    assert torch.equal(a.boundaries, b.boundaries)
    for ha, hb in zip(a.hidden + [s.c for s in a.state], b.hidden + [s.c for s in b.state]):
        torch.testing.assert_close(hb, ha, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(b.boundary_logits, a.boundary_logits, rtol=1e-10, atol=1e-12)

class ClampStraightThrough(StepEstimator):
    """A plugin-like estimator whose backward keeps its own input (``clamp`` does): the
    sequence path must hand it a logit that later steps do not overwrite."""

    def forward(self, logit):
        hard = (logit > 0).to(logit.dtype)
        soft = torch.clamp(logit, -1.0, 1.0)
        return hard + (soft - soft.detach())  # exactly 0 or 1 forward


@pytest.mark.parametrize("layer_norm", [False, True])
def test_sequence_with_an_estimator_that_keeps_its_input(layer_norm):
    compare(ClampStraightThrough, layer_norm, torch.float64, normwise(1e-9), impl="sequence")


@pytest.mark.parametrize("sizes", [[7], [5, 9]], ids=["one-layer", "two-layers-widening"])
@pytest.mark.parametrize("layer_norm", [False, True])
def test_sequence_gradients_for_other_depths(sizes, layer_norm):
    """One layer (no boundary detector, no gated term) and two layers with the upper one wider."""
    torch.manual_seed(0)
    ref = HMStack(4, sizes, StepEstimator(slope=2.0), layer_norm=layer_norm, impl="reference").double()
    fast = copy.deepcopy(ref)
    fast.impl = "sequence"
    head = SoftmaxHead(sizes, 6, 5).double()
    x, y = torch.randn(3, 16, 4, dtype=torch.float64), torch.randint(0, 6, (3, 16))
    state = [s.detach() for s in ref(torch.randn(3, 5, 4, dtype=torch.float64)).state]
    every = len(sizes) > 1  # one layer has no boundary logits to put in the loss (their mean is NaN)
    a, la, ga = run_with_gradients(ref, head, x, y, state, seed=1, all_outputs=every)
    b, lb, gb = run_with_gradients(fast, head, x, y, state, seed=1, all_outputs=every)
    assert torch.equal(a.boundaries, b.boundaries)
    if every:
        assert 0 < a.boundaries[..., 0].mean() < 1
    check = normwise(1e-9)
    check(lb, la, "loss")
    for l, (ha, hb) in enumerate(zip(a.hidden, b.hidden)):
        check(hb, ha, f"h{l + 1}")
    assert ga.keys() == gb.keys()
    for name in ga:
        check(gb[name], ga[name], name)

@pytest.mark.parametrize("impl", ["sequence"])
def test_fast_equals_reference_with_given_boundaries(impl):
    """Oracle boundaries (``boundaries=``) replace the estimator on every path."""
    torch.manual_seed(0)
    ref = HMStack(5, [8, 7, 6], StepEstimator(), impl="reference").double()
    fast = copy.deepcopy(ref)
    fast.impl = impl
    x = torch.randn(3, 12, 5, dtype=torch.float64)
    oracle = (torch.rand(3, 12, 2) < 0.4).double()
    a, b = ref(x, boundaries=oracle), fast(x, boundaries=oracle)
    assert torch.equal(a.boundaries, b.boundaries)
    assert torch.equal(a.operations, b.operations)
    for ha, hb in zip(a.hidden, b.hidden):
        torch.testing.assert_close(hb, ha, rtol=1e-12, atol=1e-12)
    ga = torch.autograd.grad(sum(h.sum() for h in a.hidden), list(ref.parameters()), allow_unused=True)
    gb = torch.autograd.grad(sum(h.sum() for h in b.hidden), list(fast.parameters()), allow_unused=True)
    for u, v in zip(ga, gb):
        assert (u is None) == (v is None) or (u if v is None else v).abs().max() == 0
        if u is not None and v is not None:
            torch.testing.assert_close(v, u, rtol=1e-10, atol=1e-12)


def test_sequence_keeps_copy_bit_exact_and_runs_without_grad():
    torch.manual_seed(0)
    stack = HMStack(4, [6, 5], StepEstimator(), impl="sequence")
    x = torch.randn(2, 9, 4)
    oracle = torch.zeros(2, 9, 1)
    oracle[:, 3] = 1.0  # layer 1 ends a segment at step 3 only: layer 2 updates at 3, copies elsewhere
    with torch.no_grad():
        out = stack(x, boundaries=oracle)
    top = out.hidden[1]
    assert torch.equal(top[:, 4:], top[:, 3:4].expand_as(top[:, 4:]))  # bit for bit
    assert torch.equal(top[:, :3], torch.zeros_like(top[:, :3]))
    assert not top.requires_grad


@pytest.mark.parametrize("estimator", [StepEstimator, SoftEstimator], ids=lambda c: c.__name__)
def test_layer_norm_fp32_is_as_close_to_fp64_as_without_it(estimator):
    """Layer norm placed on the bottom-up term and the cell only (HMCell's docstring) keeps fp32
    near fp64. When the recurrent and top-down terms were normalised too, the recurrence
    amplified rounding like it amplified gradients: this test then measured the fp32 reference
    loop's gradients 2.1e-3 (step) and 0.37 (soft) of their largest entry away from fp64."""
    torch.manual_seed(0)
    exact = HMStack(6, [16, 12, 10], estimator(slope=2.0), layer_norm=True, impl="reference").double()
    with torch.no_grad():
        for cell in exact.cells:
            cell.bias[-1] = 0.0
    head = SoftmaxHead([16, 12, 10], 9, 8).double()
    x, y = torch.randn(5, 30, 6, dtype=torch.float64), torch.randint(0, 9, (5, 30))
    state = [s.detach() for s in exact(torch.randn(5, 7, 6, dtype=torch.float64)).state]
    truth, _, g_truth = run_with_gradients(exact, head, x, y, state, seed=1)
    for impl in ["reference", "sequence"]:
        stack = copy.deepcopy(exact).float()
        stack.impl = impl
        state32 = [type(s)(*(t.float() for t in s)) for s in state]
        out, _, grads = run_with_gradients(stack, copy.deepcopy(head).float(), x.float(), y, state32, seed=1)
        if estimator.discrete:
            assert torch.equal(out.boundaries.double(), truth.boundaries), impl
        error = max(
            ((grads[n].double() - g_truth[n]).abs().max() / g_truth[n].abs().max().clamp_min(1e-30)).item() for n in g_truth
        )
        assert error < 1e-4, (impl, error)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (run with HMRNN_TEST_CUDA=1)")
@pytest.mark.parametrize("estimator", ESTIMATORS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("layer_norm", [False, True])
def test_fast_equals_reference_on_cuda(estimator, layer_norm):
    torch.backends.cuda.matmul.allow_tf32 = False
    for impl in ["sequence"]:
        compare(estimator, layer_norm, torch.float64, normwise(1e-9), device="cuda", impl=impl)
        if not layer_norm:
            compare(estimator, layer_norm, torch.float32, close(dict(rtol=1e-5, atol=1e-6)), device="cuda", impl=impl)


def test_auto_picks_the_fastest_path_that_applies():
    assert HMStack(4, [5, 5], StepEstimator()).active_impl() == "sequence"
    assert HMStack(4, [5, 5], StepEstimator(), layer_norm=True).active_impl() == "sequence"
    assert HMStack(4, [5, 5], StepEstimator(), cell="hm_rnn").active_impl() == "reference"
    assert HMStack(4, [5, 5], StepEstimator(), impl="reference").active_impl() == "reference"
    learnable = StepEstimator()
    learnable.temperature = torch.nn.Parameter(torch.ones(()))  # a plugin's learnable estimator
    assert HMStack(4, [5, 5], learnable).active_impl() == "reference"
    assert HMStack(4, [5, 5], learnable, layer_norm=True).active_impl() == "reference"
    with pytest.raises(ValueError, match="needs HM-LSTM cells"):
        HMStack(4, [5], StepEstimator(), cell="hm_rnn", impl="sequence")
    with pytest.raises(ValueError, match="impl must be"):
        HMStack(4, [5], StepEstimator(), impl="fast")


@pytest.mark.parametrize("impl,layer_norm", FAST)
def test_bf16_autocast_products_with_fp32_state(impl, layer_norm):
    """Mixed precision: bf16 matrix products, fp32 states, gates and decisions, with the
    boundaries fixed (a flipped decision would change the whole trajectory).

    Without layer norm the values and gradients stay within bf16 rounding of the fp32 run.
    With it they cannot: layer norm scales each term's product, and its bf16 rounding, up to
    O(1); the reference loop's own bf16 run is 0.17 from fp32 in ``h`` and its gradients
    off by 3x their largest entry, the same for every path. There the fast path is held to
    the reference loop under the same autocast (seen: ``h`` 1.5e-7, gradients 1.4e-2)."""
    torch.manual_seed(0)
    stack = HMStack(8, [32, 24, 16], StepEstimator(), impl=impl, layer_norm=layer_norm)
    x = torch.randn(4, 20, 8)
    oracle = (torch.rand(4, 20, 2) < 0.4).float()

    def run_once(stack, autocast):
        stack.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = stack(x, boundaries=oracle)
        loss = sum((h * h).sum() for h in out.hidden)
        loss.backward()
        return out, {n: p.grad.clone() for n, p in stack.named_parameters()}

    exact, g_exact = run_once(stack, False)
    mixed, g_mixed = run_once(stack, True)
    assert all(h.dtype == torch.float32 for h in mixed.hidden) and mixed.state[0].c.dtype == torch.float32
    assert torch.equal(mixed.boundaries, exact.boundaries)
    assert any(not torch.equal(a, b) for a, b in zip(mixed.hidden, exact.hidden))  # bf16 really was used
    atol = 3e-2
    if layer_norm:
        reference = copy.deepcopy(stack)
        reference.impl = "reference"
        exact, g_exact = run_once(reference, True)
        atol = 1e-5
    for a, b in zip(mixed.hidden, exact.hidden):
        torch.testing.assert_close(a, b, rtol=0, atol=atol)
    for name in g_exact:
        err = (g_mixed[name] - g_exact[name]).abs().max() / g_exact[name].abs().max().clamp_min(1e-12)
        assert err < 5e-2, (name, float(err))
