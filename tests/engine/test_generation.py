"""HMStack.step (one step for generation) against forward()."""

import pytest
import torch

from hmrnn_lightning import HMStack
from hmrnn_lightning.engine import cpu_fused
from hmrnn_lightning.estimators import SoftEstimator, StepEstimator


def stepwise(stack, x, state=None):
    outs = []
    for t in range(x.shape[1]):
        out = stack.step(x[:, t], state)
        state = out.state
        outs.append(out)
    return outs


def stacked(outs, attr):
    return torch.cat([getattr(o, attr) for o in outs], dim=1)


@pytest.mark.parametrize(
    "kwargs",
    [dict(estimator=StepEstimator), dict(estimator=SoftEstimator), dict(estimator=StepEstimator, layer_norm=True),
     dict(estimator=StepEstimator, cell="hm_rnn")],
    ids=["step", "soft", "layer-norm", "hm-rnn"],
)
def test_step_by_step_equals_the_whole_sequence(kwargs):
    torch.manual_seed(0)
    estimator = kwargs.pop("estimator")(slope=2.0)
    stack = HMStack(6, [16, 12, 10], estimator, **kwargs).double().eval()
    with torch.no_grad():
        for cell in stack.cells:
            cell.bias[-1] = -0.2  # some rows of the upper layers in COPY
    x = torch.randn(7, 40, 6, dtype=torch.float64)
    with torch.no_grad():
        whole = stack(x)
    outs = stepwise(stack, x)
    if estimator.discrete:
        assert torch.equal(stacked(outs, "boundaries"), whole.boundaries)
        assert 0.05 < whole.operations[..., 1, 1].mean() < 0.95  # layer 2 copies part of the time
    else:
        torch.testing.assert_close(stacked(outs, "boundaries"), whole.boundaries, rtol=1e-9, atol=1e-9)
    for l, h in enumerate(whole.hidden):
        torch.testing.assert_close(torch.cat([o.hidden[l] for o in outs], 1), h, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(stacked(outs, "operations"), whole.operations)
    logits = stacked(outs, "boundary_logits")
    computed = ~torch.isnan(logits)
    torch.testing.assert_close(logits[computed], whole.boundary_logits[computed], rtol=1e-9, atol=1e-9)
    # a logit is missing only where the layer copied (and then nothing of it was computed)
    assert torch.all(whole.operations[..., :-1, 1][~computed] == 1)


@pytest.mark.parametrize("fused", [False, True], ids=["pytorch-loop", "fused"])
@pytest.mark.parametrize("layer_norm", [False, True])
def test_copy_rows_keep_their_state(layer_norm, fused, monkeypatch):
    """Rows in COPY keep h, c and z exactly. The PyTorch loop does not compute them at all (the
    very same tensors come back, their logits read NaN); the fused kernels run every row densely
    (COPY's weights are exactly 0 and 1) and report every logit."""
    monkeypatch.setattr(cpu_fused, "ENABLED", fused)
    torch.manual_seed(0)
    stack = HMStack(4, [6, 5, 4], StepEstimator(), layer_norm=layer_norm).eval()
    state = [s for s in stack(torch.randn(3, 5, 4)).state]
    state = [type(s)(s.h.detach(), s.c.detach(), torch.zeros_like(s.z)) for s in state]  # nobody fired
    with torch.no_grad():
        for cell in stack.cells[:1]:
            cell.bias[-1] = -50.0  # layer 1 does not fire: layers 2 and 3 copy
    out = stack.step(torch.randn(3, 4), state)
    for l in (1, 2):
        for new, old in ((out.state[l].h, state[l].h), (out.state[l].c, state[l].c), (out.state[l].z, state[l].z)):
            assert new is old if not fused else torch.equal(new, old)
    assert torch.isnan(out.boundary_logits[:, 0, 1]).all() != fused
    assert torch.equal(out.operations[:, 0, 1:, 1], torch.ones(3, 2))


def test_step_sees_weights_changed_in_place():
    """The prepared weights are cached; an optimizer step must invalidate them."""
    torch.manual_seed(0)
    stack = HMStack(4, [6, 5], StepEstimator()).eval()
    x = torch.randn(2, 4)
    stack.step(x)
    with torch.no_grad():
        for p in stack.parameters():
            p.add_(0.1)
    expected = stack(x.unsqueeze(1)).hidden[0]
    torch.testing.assert_close(stack.step(x).hidden[0], expected.detach())


def test_step_under_bf16_autocast_keeps_fp32_state():
    torch.manual_seed(0)
    stack = HMStack(4, [6, 5], StepEstimator()).eval()
    x = torch.randn(2, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = stack.step(x)
    assert all(s.h.dtype == torch.float32 and s.c.dtype == torch.float32 for s in out.state)
    with torch.no_grad():
        exact = stack(x.unsqueeze(1))
    assert torch.equal(out.boundaries, exact.boundaries)
    torch.testing.assert_close(out.hidden[0], exact.hidden[0], rtol=0, atol=2e-2)  # bf16 products


def test_step_rejects_a_sequence():
    stack = HMStack(4, [6, 5], StepEstimator())
    with pytest.raises(ValueError, match=r"expected input of shape \[batch, 4\]"):
        stack.step(torch.randn(2, 3, 4))
