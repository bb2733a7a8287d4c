"""The GPU path (``impl="triton"``: matrix products and the Triton kernels of
``engine/kernels.py``) gives the reference loop's outputs, boundaries, final state and
every gradient.

Without a GPU the kernels run under Triton's interpreter on CPU tensors (``conftest.py`` sets
``TRITON_INTERPRET=1``), which is slow per launch, so the sequences here are short. With
``HMRNN_TEST_CUDA=1`` the same tests run on the GPU, and the bf16 ones too.
"""

import copy
import os

import pytest
import torch

from hmrnn_lightning import HMStack
from hmrnn_lightning.estimators import BernoulliEstimator, ReinforceEstimator, SoftEstimator, StepEstimator
from tests.helpers import close, compare, normwise, replay_bernoulli_draws

pytest.importorskip("triton")

ON_CUDA = bool(os.environ.get("HMRNN_TEST_CUDA")) and torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"
if not ON_CUDA and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)
STEPS = 8  # the interpreter runs a few dozen launches a second (about 0.05 s each)


@pytest.fixture(autouse=True)
def _exact_products():
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 products on the GPU, as the reference
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


@pytest.mark.parametrize("layer_norm", [False, True], ids=["plain", "layer_norm"])
@pytest.mark.parametrize("estimator", [StepEstimator, BernoulliEstimator, SoftEstimator], ids=lambda c: c.__name__)
def test_triton_equals_reference_in_fp32(estimator, layer_norm):
    """Outputs, boundaries, final state and the gradients of every parameter, the input and the
    initial state, with UPDATE, COPY and FLUSH all occurring (``compare`` asserts that)."""
    check = normwise(1e-5) if layer_norm else close(dict(rtol=1e-5, atol=1e-6))
    hook = replay_bernoulli_draws(5, 3, STEPS, DEVICE) if estimator is BernoulliEstimator else None
    compare(estimator, layer_norm, torch.float32, check, device=DEVICE, impl="triton", steps=STEPS, reference_hook=hook)


@pytest.mark.parametrize("layer_norm", [False, True], ids=["plain", "layer_norm"])
def test_triton_equals_reference_without_flush_gradient(layer_norm):
    check = normwise(1e-5) if layer_norm else close(dict(rtol=1e-5, atol=1e-6))
    compare(StepEstimator, layer_norm, torch.float32, check, device=DEVICE, impl="triton", steps=STEPS, flush_gradient=False)


def test_triton_with_the_task_loss_alone():
    """No gradient reaches the boundary logits or the state from outside: rows in COPY get ds = 0."""
    compare(StepEstimator, False, torch.float32, close(dict(rtol=1e-5, atol=1e-6)), device=DEVICE, impl="triton",
            steps=STEPS, all_outputs=False)


@pytest.mark.parametrize("layer_norm", [False, True], ids=["plain", "layer_norm"])
def test_triton_with_given_boundaries(layer_norm):
    """Oracle boundaries replace the estimator; COPY carries h bit for bit."""
    torch.manual_seed(0)
    ref = HMStack(5, [8, 7, 6], StepEstimator(), layer_norm=layer_norm, impl="reference").to(DEVICE)
    fast = copy.deepcopy(ref)
    fast.impl = "triton"
    x = torch.randn(3, STEPS, 5, device=DEVICE)
    oracle = (torch.rand(3, STEPS, 2, device=DEVICE) < 0.4).float()
    a, b = ref(x, boundaries=oracle), fast(x, boundaries=oracle)
    assert torch.equal(a.boundaries, b.boundaries)
    assert torch.equal(a.operations, b.operations)
    copies = b.operations[:, 1:, 1, 1] == 1  # layer 2 in COPY at t >= 1
    assert copies.any()
    assert torch.equal(b.hidden[1][:, 1:][copies], b.hidden[1][:, :-1][copies])
    for ha, hb in zip(a.hidden, b.hidden):
        torch.testing.assert_close(hb, ha, rtol=1e-5, atol=1e-6)
    ga = torch.autograd.grad(sum(h.sum() for h in a.hidden), list(ref.parameters()))
    gb = torch.autograd.grad(sum(h.sum() for h in b.hidden), list(fast.parameters()))
    for (name, _), u, v in zip(ref.named_parameters(), ga, gb):
        torch.testing.assert_close(v, u, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("layer_norm", [False, True], ids=["plain", "layer_norm"])
def test_triton_without_grad_and_the_generation_step(layer_norm):
    """Inference keeps one pre-activation slot per layer; ``step`` (sampling) runs the same
    kernels on one step, dense, and equals the reference step."""
    torch.manual_seed(0)
    ref = HMStack(5, [8, 7, 6], SoftEstimator(), layer_norm=layer_norm, impl="reference").to(DEVICE).eval()
    fast = copy.deepcopy(ref)
    fast.impl = "triton"
    x = torch.randn(3, STEPS, 5, device=DEVICE)
    with torch.no_grad():
        a, b = ref(x), fast(x)
    assert not b.hidden[0].requires_grad
    for ha, hb in zip(a.hidden, b.hidden):
        torch.testing.assert_close(hb, ha, rtol=1e-5, atol=1e-6)
    state_a = state_b = None
    for t in range(4):
        sa, sb = ref.step(x[:, t], state_a), fast.step(x[:, t], state_b)
        state_a, state_b = sa.state, sb.state
        for ha, hb in zip(sa.hidden, sb.hidden):
            torch.testing.assert_close(hb, ha, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sb.boundary_logits, sa.boundary_logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layer_norm", [False, True], ids=["plain", "layer_norm"])
def test_triton_under_bf16_autocast_matches_the_cpu_path(layer_norm):
    """Mixed precision: bf16 products, fp32 state. The products are the same bf16 products as
    the sequence path's, so the two agree far closer than either agrees with fp32 (which
    ``test_fast_paths.py`` bounds); boundaries are fixed so no decision flips."""
    torch.manual_seed(0)
    seq = HMStack(8, [32, 24, 16], StepEstimator(), impl="sequence", layer_norm=layer_norm).to(DEVICE)
    fast = copy.deepcopy(seq)
    fast.impl = "triton"
    x = torch.randn(4, STEPS, 8, device=DEVICE)
    oracle = (torch.rand(4, STEPS, 2, device=DEVICE) < 0.4).float()

    def run_once(stack):
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            out = stack(x, boundaries=oracle)
        loss = sum((h * h).sum() for h in out.hidden)
        return out, torch.autograd.grad(loss, list(stack.parameters()))

    a, ga = run_once(seq)
    b, gb = run_once(fast)
    assert all(h.dtype == torch.float32 for h in b.hidden) and b.state[0].c.dtype == torch.float32
    for ha, hb in zip(a.hidden, b.hidden):
        normwise(1e-2)(hb, ha)
    for (name, _), u, v in zip(seq.named_parameters(), ga, gb):
        normwise(5e-2)(v, u, name)


def test_auto_and_explicit_choice(monkeypatch):
    assert HMStack(4, [5, 5], StepEstimator()).active_impl("cpu") == "sequence"  # the CPU keeps its path
    assert HMStack(4, [5, 5], StepEstimator(), impl="triton").active_impl(DEVICE) == "triton"
    with pytest.raises(ValueError, match="step, Bernoulli and soft estimators only, not ReinforceEstimator"):
        HMStack(4, [5, 5], ReinforceEstimator(), impl="triton")
    with pytest.raises(ValueError, match="HM-LSTM cells only"):
        HMStack(4, [5, 5], StepEstimator(), cell="hm_rnn", impl="triton")
    if not ON_CUDA:
        # a model trained on a GPU with impl='triton' and loaded on a CPU runs the CPU's path
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        monkeypatch.setattr("hmrnn_lightning.cells.stack._WARNED", set())
        stack = HMStack(4, [5, 5], StepEstimator(), impl="triton")
        with pytest.warns(UserWarning, match="runs on CUDA tensors.*runs impl='sequence'"):
            assert stack.active_impl("cpu") == "sequence"
        out = stack(torch.randn(2, 3, 4))
        assert out.boundaries.shape == (2, 3, 2)


def test_a_learnable_or_subclassed_estimator_is_not_taken_by_the_kernels():
    from hmrnn_lightning.engine.plan import BERNOULLI, STEP
    from hmrnn_lightning.engine.plan import kernel_mode as estimator_mode

    class Sharper(StepEstimator):
        def forward(self, logit):
            return super().forward(2 * logit)

    assert estimator_mode(StepEstimator()) == STEP
    assert estimator_mode(Sharper()) is None
    b = BernoulliEstimator()
    assert estimator_mode(b) == BERNOULLI
    assert estimator_mode(b.eval()) == STEP  # thresholds at evaluation


@pytest.mark.skipif(not ON_CUDA, reason="CUDA graphs need a GPU (run with HMRNN_TEST_CUDA=1)")
@pytest.mark.parametrize("layer_norm", [False, True], ids=["plain", "layer_norm"])
def test_cuda_graph_windows_and_steps_equal_the_uncaptured_path(layer_norm):
    """Three training windows with the state carried (the first captures, the others replay),
    then a shorter window (its own capture), then sampling steps: same values and gradients as
    without capture."""
    torch.manual_seed(0)
    plain = HMStack(6, [16, 12, 10], StepEstimator(), layer_norm=layer_norm, impl="triton").to(DEVICE)
    graphed = copy.deepcopy(plain)
    graphed.cuda_graph = True
    states = {"plain": None, "graphed": None}
    for length in (STEPS, STEPS, STEPS, 5):
        x = torch.randn(4, length, 6, device=DEVICE)
        results = {}
        for name, stack in (("plain", plain), ("graphed", graphed)):
            xi = x.clone().requires_grad_()
            out = stack(xi, states[name])
            loss = sum((h * h).sum() for h in out.hidden) + out.boundary_logits.pow(2).sum()
            grads = torch.autograd.grad(loss, [xi, *stack.parameters()])
            states[name] = [s.detach() for s in out.state]
            results[name] = (out, grads)
        (a, ga), (b, gb) = results["plain"], results["graphed"]
        assert torch.equal(a.boundaries, b.boundaries)
        for ha, hb in zip(a.hidden, b.hidden):
            torch.testing.assert_close(hb, ha, rtol=1e-5, atol=1e-6)
        for u, v in zip(ga, gb):
            torch.testing.assert_close(v, u, rtol=1e-4, atol=1e-5)
    plain.eval()
    graphed.eval()
    sa = sb = None
    for t in range(5):
        xt = torch.randn(4, 6, device=DEVICE)
        oa, ob = plain.step(xt, sa), graphed.step(xt, sb)
        sa, sb = oa.state, ob.state
        for ha, hb in zip(oa.hidden, ob.hidden):
            torch.testing.assert_close(hb, ha, rtol=1e-5, atol=1e-6)
