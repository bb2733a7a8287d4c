"""The window plan: each norm's own eps, and the padded pre-activation rows."""

import copy

import pytest
import torch

from hmrnn_lightning import HMStack, StepEstimator
from hmrnn_lightning.engine.plan import WindowPlan, padded_row


def stack_with_eps_per_layer(impl, dtype=torch.float64):
    torch.manual_seed(0)
    ref = HMStack(4, [6, 5, 4], StepEstimator(slope=2.0), layer_norm=True, impl="reference").to(dtype)
    # eps large enough to change the values: 1e-5 would hide a mix-up at these magnitudes
    for cell, (below, own) in zip(ref.cells, [(1e-5, 1e-5), (0.5, 2.0), (3.0, 0.25)]):
        cell.norm_bottom_up.eps, cell.norm_cell.eps = below, own
    fast = copy.deepcopy(ref)
    fast.impl = impl
    return ref, fast


def test_the_plan_keeps_each_norms_eps():
    _, fast = stack_with_eps_per_layer("sequence")
    plan = WindowPlan.build(fast.cells, fast.estimator, None)
    assert plan.below_eps == [1e-5, 0.5, 3.0]
    assert plan.cell_eps == [1e-5, 2.0, 0.25]


@pytest.mark.parametrize("impl", ["sequence", "triton"])
def test_a_different_eps_per_layer_matches_the_reference(impl):
    dtype = torch.float32 if impl == "triton" else torch.float64  # the kernels compute in fp32
    ref, fast = stack_with_eps_per_layer(impl, dtype)
    x = torch.randn(3, 6, 4, dtype=dtype, requires_grad=True)
    a, b = ref(x), fast(x)
    for ha, hb in zip(a.hidden, b.hidden):
        torch.testing.assert_close(hb, ha, rtol=1e-5 if impl == "triton" else 1e-9, atol=1e-6 if impl == "triton" else 1e-10)
    ga = torch.autograd.grad(sum(h.sum() for h in a.hidden), [x, *ref.parameters()])
    gb = torch.autograd.grad(sum(h.sum() for h in b.hidden), [x, *fast.parameters()])
    for u, v in zip(ga, gb):
        torch.testing.assert_close(v, u, rtol=1e-4 if impl == "triton" else 1e-8, atol=1e-5 if impl == "triton" else 1e-10)


def test_pre_activation_rows_are_padded_to_a_multiple_of_8():
    from hmrnn_lightning.engine.triton_window import _Buffers

    assert [padded_row(h) for h in (1, 2, 16, 512)] == [16, 16, 80, 2064]
    stack = HMStack(4, [6, 5], StepEstimator(), layer_norm=True)
    plan = WindowPlan.build(stack.cells, stack.estimator, None)
    buf = _Buffers(plan, torch.zeros(2, 3, 4), slots=3)
    for l, H in enumerate(plan.sizes):
        assert buf.s[l].shape[-1] == 4 * H + 1 and buf.s[l].stride(1) % 8 == 0
        assert buf.below[l].stride(1) % 8 == 0
