"""Forward values and gradients of the boundary estimators."""

import pytest
import torch

from hmrnn_lightning.estimators import (
    BernoulliEstimator, ReinforceEstimator, SoftEstimator, StepEstimator, hard_sigmoid,
)
from hmrnn_lightning.registry import RegistryError, resolve


@pytest.mark.parametrize("cls", [StepEstimator, BernoulliEstimator])
@pytest.mark.parametrize("slope", [1.0, 2.5, 5.0])
def test_straight_through_gradient_is_the_hard_sigmoid_derivative(cls, slope):
    est = cls(slope=slope)
    x = torch.tensor([-3.0, -0.9, -0.3, 0.05, 0.2, 0.7, 3.0]) / slope  # |a x| = 3, .9, .3, .05, .2, .7, 3
    x.requires_grad_(True)
    z = est(x)
    assert set(z.detach().unique().tolist()) <= {0.0, 1.0}
    z.sum().backward()
    inside = (slope * x.detach()).abs() < 1
    expected = torch.where(inside, torch.tensor(slope / 2), torch.tensor(0.0))
    torch.testing.assert_close(x.grad, expected)


def test_step_forward_is_a_threshold():
    est = StepEstimator(slope=3.0)
    x = torch.tensor([-1.0, -1e-4, 1e-4, 2.0])
    assert est(x).tolist() == [0.0, 0.0, 1.0, 1.0]


def test_bernoulli_samples_in_training_and_thresholds_in_eval():
    est = BernoulliEstimator(slope=1.0)
    x = torch.full((20000,), 0.4)  # p = 0.7
    rate = est(x).mean().item()
    assert abs(rate - 0.7) < 0.02
    est.eval()
    assert est(x).eq(1).all()
    est.sample_at_eval = True
    assert 0.6 < est(x).mean().item() < 0.8


def test_soft_is_the_hard_sigmoid():
    est = SoftEstimator(slope=2.0)
    x = torch.linspace(-2, 2, 9)
    torch.testing.assert_close(est(x), hard_sigmoid(x, 2.0))


def test_reinforce_matches_exact_gradient_of_enumerable_problem():
    """E_z[f(z)] with z ~ Bernoulli(hard_sigm(a x)): d/dx = (f(1) - f(0)) a / 2 inside the linear part."""
    torch.manual_seed(1)
    a = 2.0
    est = ReinforceEstimator(slope=a, baseline_decay=0.9)
    f = {0.0: 1.3, 1.0: 0.4}
    x = torch.tensor([0.1, -0.25, 0.3], requires_grad=True)
    exact = (f[1.0] - f[0.0]) * a / 2 * torch.ones(3)
    n = 20000
    grads = []
    for _ in range(n // 500):
        xs = x.unsqueeze(0).expand(500, 3)
        z = est(xs)
        loss = torch.where(z > 0.5, f[1.0], f[0.0])
        surrogate = est.surrogate(xs, z, loss) / 500
        (g,) = torch.autograd.grad(surrogate, x)
        grads.append(g)
        est.update_baseline(loss.mean())
    estimate = torch.stack(grads).mean(0)
    # one sample of (f - b) dlogp/dx has sd < 1 here, so the mean of 20000 has sd < 0.007
    assert torch.allclose(estimate, exact, atol=0.035), (estimate, exact)
    assert not torch.allclose(estimate, torch.zeros(3), atol=0.3)


def test_reinforce_has_no_straight_through_gradient():
    est = ReinforceEstimator()
    x = torch.zeros(5, requires_grad=True)
    assert not est(x).requires_grad


def test_slope_must_be_positive():
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="slope"):
            StepEstimator(slope=bad)
    est = StepEstimator()
    est.set_slope(4.0)
    assert float(est.slope) == 4.0
    assert "slope" in dict(est.named_buffers())


def test_unknown_estimator_name_lists_the_known_ones():
    assert resolve("estimators", "step") is StepEstimator
    with pytest.raises(RegistryError) as info:
        resolve("estimators", "gumble")
    # installed plugins (the example's "gumbel", say) are listed too, in the same sorted list
    listed = str(info.value).split("known estimators: ")[1].split(";")[0].split(", ")
    assert {"bernoulli", "reinforce", "soft", "step"} <= set(listed) and listed == sorted(listed), str(info.value)
