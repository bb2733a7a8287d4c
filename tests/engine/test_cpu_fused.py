"""The fused CPU kernels (``engine/cpu_fused``): the sequence path runs its window through them
for the step, Bernoulli and soft estimators, and gives the reference loop's outputs and gradients; where
they cannot run, the sequence path's PyTorch loop does, with the same results."""

import copy
import logging

import pytest
import torch

from hmrnn_lightning import HMStack
from hmrnn_lightning.engine import cpu_fused
from hmrnn_lightning.engine.plan import WindowPlan, matmul_dtype
from hmrnn_lightning.estimators import BernoulliEstimator, ReinforceEstimator, SoftEstimator, StepEstimator
from tests.helpers import close, compare, normwise, replay_bernoulli_draws

pytestmark = pytest.mark.skipif(cpu_fused.kernels() is None, reason="no C++ compiler to build the kernels")


def _stack(estimator=StepEstimator, layer_norm=False, dtype=torch.float64) -> HMStack:
    torch.manual_seed(0)
    return HMStack(6, [16, 12, 10], estimator(), layer_norm=layer_norm, impl="sequence").to(dtype)


def _why_not(stack, x):
    """``cpu_fused.why_not`` for the plan the stack would build for ``x``."""
    return cpu_fused.why_not(WindowPlan.build(stack.cells, stack.estimator, matmul_dtype(x)), x)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the launches of the fused kernels, so a test knows they ran."""
    calls = []
    launch = cpu_fused._Launcher._launch

    def counted(self, *args, **kwargs):
        calls.append(kwargs.get("TOP"))
        return launch(self, *args, **kwargs)

    monkeypatch.setattr(cpu_fused._Launcher, "_launch", counted)
    return calls


@pytest.mark.parametrize("estimator", [StepEstimator, SoftEstimator], ids=lambda c: c.__name__)
@pytest.mark.parametrize("layer_norm", [False, True], ids=["plain", "layer_norm"])
def test_fused_window_equals_reference_in_fp64(estimator, layer_norm, kernel_calls):
    """Every output (hidden, boundaries, logits, final state) and every gradient (parameters,
    input, initial state) within 1e-9 of each tensor's largest entry; forward and backward
    each launch one kernel per layer and step."""
    compare(estimator, layer_norm, torch.float64, normwise(1e-9), impl="sequence", steps=30)
    assert len(kernel_calls) == 2 * 3 * 30  # (forward + backward) x layers x steps, in the fast run


@pytest.mark.parametrize("estimator", [StepEstimator, SoftEstimator], ids=lambda c: c.__name__)
@pytest.mark.parametrize("layer_norm", [False, True], ids=["plain", "layer_norm"])
def test_fused_window_equals_reference_in_fp32(estimator, layer_norm):
    check = normwise(1e-5) if layer_norm else close(dict(rtol=1e-5, atol=1e-6))
    compare(estimator, layer_norm, torch.float32, check, impl="sequence")


@pytest.mark.parametrize("estimator", [StepEstimator, SoftEstimator], ids=lambda c: c.__name__)
@pytest.mark.parametrize("layer_norm", [False, True], ids=["plain", "layer_norm"])
def test_pytorch_loop_still_equals_reference(estimator, layer_norm, monkeypatch, kernel_calls):
    """With the kernels switched off, the step and soft estimators take the sequence path's
    own loop again, which must stay right for where the kernels cannot run."""
    monkeypatch.setattr(cpu_fused, "ENABLED", False)
    compare(estimator, layer_norm, torch.float64, normwise(1e-9), impl="sequence")
    assert kernel_calls == []


@pytest.mark.parametrize("layer_norm", [False, True], ids=["plain", "layer_norm"])
def test_given_boundaries_run_fused_for_any_kernel_estimator(layer_norm, kernel_calls):
    """With the boundaries given, a Bernoulli stack runs fused too (no draws to match)."""
    ref = _stack(BernoulliEstimator, layer_norm)
    fast = copy.deepcopy(ref)
    ref.impl = "reference"
    x = torch.randn(4, 12, 6, dtype=torch.float64)
    given = (torch.rand(4, 12, 2) < 0.4).double()
    a, b = ref(x, boundaries=given), fast(x, boundaries=given)
    assert kernel_calls
    assert torch.equal(a.boundaries, b.boundaries)
    for ha, hb in zip(a.hidden, b.hidden):
        torch.testing.assert_close(hb, ha, rtol=0, atol=1e-12)


def test_inference_equals_reference(kernel_calls):
    """No gradient: the window keeps one slot per layer and overwrites it step by step."""
    ref = _stack(StepEstimator, True)
    fast = copy.deepcopy(ref)
    ref.impl = "reference"
    x = torch.randn(4, 12, 6, dtype=torch.float64)
    with torch.no_grad():
        a, b = ref(x), fast(x)
    assert kernel_calls
    assert torch.equal(a.boundaries, b.boundaries)
    for ha, hb in zip(a.hidden, b.hidden):
        torch.testing.assert_close(hb, ha, rtol=0, atol=1e-12)


@pytest.mark.parametrize("why", ["reinforce", "autocast", "disabled"])
def test_what_keeps_the_pytorch_loop(why, monkeypatch):
    """Estimators the kernels lack, and autocast (the reference's rounding of the products) keep
    the PyTorch loop."""
    estimator = ReinforceEstimator if why == "reinforce" else StepEstimator
    stack = _stack(estimator, dtype=torch.float32)
    x = torch.randn(2, 3, 6)
    if why == "disabled":
        monkeypatch.setattr(cpu_fused, "ENABLED", False)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=why == "autocast"):
        reason = _why_not(stack, x)
    assert reason is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layer_norm", [False, True], ids=["plain", "layer_norm"])
def test_bernoulli_runs_fused_with_the_window_drawn_at_once(layer_norm, dtype):
    """Bernoulli draws its noise for the whole window in one call, as on a GPU; with the
    reference deciding from the same uniform numbers, outputs and gradients agree."""
    if dtype == torch.float64:
        check = normwise(1e-9)
    else:  # as the fp32 tests of the other estimators
        check = normwise(1e-5) if layer_norm else close(dict(rtol=1e-5, atol=1e-6))
    assert _why_not(_stack(BernoulliEstimator, dtype=dtype), torch.randn(2, 3, 6, dtype=dtype)) is None
    compare(BernoulliEstimator, layer_norm, dtype, check, impl="sequence",
            reference_hook=replay_bernoulli_draws(5, 3, 30, dtype=dtype))


def test_step_estimator_runs_fused():
    assert _why_not(_stack(StepEstimator, dtype=torch.float32), torch.randn(2, 3, 6)) is None


def test_without_a_compiler_the_pytorch_loop_runs_and_says_so_once(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("HMRNN_CACHE_DIR", str(tmp_path))  # nothing built there yet
    monkeypatch.setattr(cpu_fused, "_SOURCE", tmp_path / "cpu_fused.cpp")
    (tmp_path / "cpu_fused.cpp").write_text("// a source version never built\n")
    cpu_fused._library.cache_clear()
    cpu_fused.kernels.cache_clear()
    try:
        with caplog.at_level(logging.DEBUG, logger=cpu_fused.__name__):
            stack = _stack(StepEstimator, dtype=torch.float32)
            assert _why_not(stack, torch.randn(2, 3, 6)) is not None
            stack(torch.randn(2, 3, 6))
            stack(torch.randn(2, 3, 6))
        notes = [r for r in caplog.records if "fused CPU kernels are unavailable" in r.getMessage()]
        assert len(notes) == 1 and notes[0].levelno == logging.DEBUG
    finally:
        cpu_fused._library.cache_clear()
        cpu_fused.kernels.cache_clear()


def test_wide_layers_keep_the_sequence_loop(monkeypatch):
    """Above MAX_HIDDEN the sequence loop's row skipping pays more than the fused kernels."""
    stack = _stack(StepEstimator, dtype=torch.float32)  # widest layer 16
    x = torch.randn(2, 3, 6)
    monkeypatch.setattr(cpu_fused, "MAX_HIDDEN", 15)
    assert "wider than 15" in _why_not(stack, x)
    monkeypatch.setattr(cpu_fused, "MAX_HIDDEN", 16)
    assert _why_not(stack, x) is None


def test_each_norms_own_eps_reaches_the_kernels(kernel_calls):
    """Every layer norm with its own eps (large enough to matter): the fused window still equals
    the reference, so the kernels read the per-layer ``below_eps`` and ``cell_eps``."""
    ref = _stack(StepEstimator, True)
    for l, cell in enumerate(ref.cells):
        cell.norm_bottom_up.eps, cell.norm_cell.eps = 0.5 * (l + 1), 0.25 * (l + 2)
    fast = copy.deepcopy(ref)
    ref.impl = "reference"
    x = torch.randn(4, 12, 6, dtype=torch.float64)
    a, b = ref(x), fast(x)
    assert kernel_calls
    assert torch.equal(a.boundaries, b.boundaries)
    for ha, hb in zip(a.hidden, b.hidden):
        torch.testing.assert_close(hb, ha, rtol=0, atol=1e-12)


@pytest.mark.parametrize("top_z", [0.0, 1.0])
def test_the_top_layers_z_is_the_top_z_given(top_z):
    """The top layer's ``z`` is the ``top_z`` argument, as in the Triton kernel."""
    forward, _ = cpu_fused.kernels()
    B, H = 3, 5
    row = 4 * H + 1 + 2  # a padded row: the kernel must step ROW, not 4H + 1
    s = torch.randn(B, row, dtype=torch.float64)
    state = [torch.randn(B, H, dtype=torch.float64) for _ in range(2)]
    c, h, z = torch.empty(B, H, dtype=torch.float64), torch.empty(B, H, dtype=torch.float64), torch.full((B,), 7.0, dtype=torch.float64)
    nothing = dict.fromkeys(["base_ptr", "below_ptr", "gb_ptr", "bb_ptr", "zb_ptr", "gc_ptr", "bc_ptr", "given_ptr",
                             "e_ptr", "logit_ptr", "own_ptr", "up_ptr", "down_ptr"])
    forward[(B,)](
        s_ptr=s, **nothing, base_stride=0, c_prev_ptr=state[0], h_prev_ptr=state[1], zp_ptr=torch.ones(B, dtype=torch.float64),
        slope_ptr=torch.ones(1, dtype=torch.float64), c_ptr=c, h_ptr=h, z_ptr=z, own_stride=0, up_stride=0,
        down_stride=0, below_eps=0.0, cell_eps=0.0, top_z=top_z, H=H, BLOCK=8, ROW=row, HAS_BASE=False,
        HAS_BELOW=False, BELOW_GATED=False, NORM_BELOW=False, NORM_CELL=False, TOP=True, MODE=1, WRITE_OWN=False,
        WRITE_UP=False, WRITE_DOWN=False, num_warps=4,
    )
    assert torch.equal(z, torch.full((B,), top_z, dtype=torch.float64))
    # z_prev = 1 (FLUSH): c = i * g of every row's own slice of s, read ROW apart
    i, g = torch.sigmoid(s[:, H : 2 * H]), torch.tanh(s[:, 3 * H : 4 * H])
    torch.testing.assert_close(c, i * g, rtol=1e-12, atol=1e-12)


def test_a_keyword_the_port_does_not_know_raises():
    """A switch the Triton kernel grew and the C port lacks must not be dropped silently."""
    forward, _ = cpu_fused.kernels()
    with pytest.raises((TypeError, KeyError)):
        forward[(1,)](s_ptr=torch.zeros(1, 8), H=1, ROW=8, NEW_SWITCH=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_saturated_gates_stay_finite(dtype):
    """Pre-activations far beyond exp's range (exp overflows to inf) give the saturated gates, not
    NaN: with fast-math's finite-math assumption they did, and training's loss went NaN."""
    forward, _ = cpu_fused.kernels()
    B, H = 4, 16
    row = 4 * H + 1
    s = torch.tensor([-1000.0, 1000.0]).repeat(B * row // 2 + 1)[: B * row].view(B, row).to(dtype).contiguous()
    s[:, 2 * H : 3 * H] = 1000.0  # the output gate open
    expected_c = torch.sigmoid(s[:, H : 2 * H]) * torch.tanh(s[:, 3 * H : 4 * H])  # z_prev = 1: FLUSH
    zeros = torch.zeros(B, H, dtype=dtype)
    c, h, z = torch.empty(B, H, dtype=dtype), torch.empty(B, H, dtype=dtype), torch.empty(B, dtype=dtype)
    nothing = dict.fromkeys(["base_ptr", "below_ptr", "gb_ptr", "bb_ptr", "zb_ptr", "gc_ptr", "bc_ptr", "given_ptr",
                             "e_ptr", "logit_ptr", "own_ptr", "up_ptr", "down_ptr"])
    forward[(B,)](
        s_ptr=s, **nothing, base_stride=0, c_prev_ptr=zeros, h_prev_ptr=zeros, zp_ptr=torch.ones(B, dtype=dtype),
        slope_ptr=torch.ones(1, dtype=dtype), c_ptr=c, h_ptr=h, z_ptr=z, own_stride=0, up_stride=0, down_stride=0,
        below_eps=0.0, cell_eps=0.0, top_z=0.0, H=H, BLOCK=16, ROW=row, HAS_BASE=False, HAS_BELOW=False,
        BELOW_GATED=False, NORM_BELOW=False, NORM_CELL=False, TOP=True, MODE=1, WRITE_OWN=False, WRITE_UP=False,
        WRITE_DOWN=False, num_warps=4,
    )
    assert torch.isfinite(c).all() and torch.isfinite(h).all()
    torch.testing.assert_close(c, expected_c)
    torch.testing.assert_close(h, torch.tanh(expected_c))


@pytest.mark.parametrize("hidden", [[16, 16, 16], [16, 12, 10]], ids=["rows_aligned", "rows_unaligned"])
def test_two_halves_equal_one_pass_in_fp32_with_layer_norm(hidden, kernel_calls):
    """MKL rounds by its operands' alignment: the bottom-up product reads ``h``'s rows in place
    only where they are 64-byte aligned (H a multiple of 16), so a window split in two still
    equals one pass bit for bit."""
    torch.manual_seed(0)
    s = HMStack(6, hidden, StepEstimator(), layer_norm=True, impl="sequence")
    x = torch.randn(3, 14, 6)
    with torch.no_grad():
        whole = s(x)
        first = s(x[:, :7])
        second = s(x[:, 7:], first.state)
    assert kernel_calls
    for l in range(3):
        assert torch.equal(torch.cat([first.hidden[l], second.hidden[l]], 1), whole.hidden[l])
    assert torch.equal(torch.cat([first.boundaries, second.boundaries], 1), whole.boundaries)
