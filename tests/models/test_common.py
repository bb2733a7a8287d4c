"""The pieces both LightningModules share: the boundary-rate target's check and penalty, the
entropy guide, and gradient clipping."""

import functools
import math
from types import SimpleNamespace

import pytest
import torch

from hmrnn_lightning import HMStack, StepEstimator
from hmrnn_lightning.heads import MixtureDensityHead
from hmrnn_lightning.models import HandwritingModel
from hmrnn_lightning.models.common import check_rate_target, clip_gradients_by_default, entropy_guide, rate_penalty


def test_rate_penalty_counts_only_the_masked_steps():
    logits = torch.tensor([[[1.0], [1.0], [-1.0], [-1.0]]])  # [B=1, T=4, 1]: fires on 2 of 4 steps
    assert rate_penalty(logits, [0.5], 1.0).item() == pytest.approx(0.0)
    mask = torch.tensor([[True, True, False, False]])  # the last two steps are padding
    assert rate_penalty(logits, [0.5], 1.0, mask).item() == pytest.approx(0.25)  # rate 1 against 0.5
    logits[0, 3, 0] = float("nan")  # a padded step's NaN does not reach the penalty
    assert rate_penalty(logits, [0.5], 2.0, mask).item() == pytest.approx(0.5)
    assert rate_penalty(logits, [None], 1.0, mask) is None and rate_penalty(logits, None, 1.0) is None


def test_rate_penalty_gradient_reaches_saturated_logits():
    logits = torch.full((2, 3, 1), -30.0, requires_grad=True)  # never fires
    rate_penalty(logits, [0.5], 1.0).backward()
    assert (logits.grad < 0).all()  # descending the penalty raises every logit


def test_check_rate_target_names_the_owner_and_the_problem():
    check_rate_target("M", None, 1.0, 2)
    with pytest.raises(ValueError, match="M: boundary_rate_target has 1 entries, the stack has 2 boundary layers"):
        check_rate_target("M", [0.1], 1.0, 2)
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        check_rate_target("M", [0.0], 1.0, 1)
    with pytest.raises(ValueError, match="boundary_rate_weight >= 0"):
        check_rate_target("M", [0.2], -1.0, 1)


def test_entropy_guide_marks_the_most_uncertain_positions():
    """Layer 1 is pulled towards the 2 of 8 positions with the flattest next-symbol distribution
    (a share of 0.25), layer 2 towards the 1 flattest; the head's logits get no gradient."""
    logits = torch.full((1, 8, 4), 0.0)
    logits[0, :, 0] = 10.0  # sure of symbol 0 everywhere ...
    logits[0, 3, 0] = 0.0  # ... except at step 3 (uniform: the highest entropy)
    logits[0, 6, 0] = 1.0  # and step 6 (next highest)
    logits.requires_grad_(True)
    boundary = torch.zeros(1, 8, 2, requires_grad=True)
    loss = entropy_guide(boundary, logits, [0.25, 0.125], 2.0)
    assert loss.item() == pytest.approx(2.0 * 2 * math.log(2.0))  # every logit 0: BCE log 2 per layer
    loss.backward()
    pulled_up = (boundary.grad[0] < 0).nonzero().tolist()
    assert pulled_up == [[3, 0], [3, 1], [6, 0]]
    assert logits.grad is None
    assert entropy_guide(boundary, logits, [None, None], 1.0) is None and entropy_guide(boundary, logits, None, 1.0) is None


def test_entropy_guide_marks_exactly_its_share_on_ties():
    """A young model's flat predictions tie everywhere; the share still marks round(r * B * T) positions."""
    boundary = torch.zeros(2, 10, 1, requires_grad=True)
    entropy_guide(boundary, torch.zeros(2, 10, 5), [0.3], 1.0).backward()
    assert int((boundary.grad < 0).sum()) == 6


def handwriting_model(**kwargs) -> HandwritingModel:
    return HandwritingModel(
        stack=functools.partial(HMStack, hidden_sizes=[8, 8], estimator=StepEstimator()),
        head=functools.partial(MixtureDensityHead, num_components=2, embed_dim=8), **kwargs,
    )


def test_handwriting_model_takes_a_rate_target():
    with pytest.raises(ValueError, match="HandwritingModel: boundary_rate_target has 2 entries"):
        handwriting_model(boundary_rate_target=[0.1, 0.1])
    torch.manual_seed(0)
    inputs, targets = torch.randn(3, 12, 3), torch.randn(3, 12, 3)
    targets[..., 2] = (targets[..., 2] > 0).float()
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[0, 6:] = False
    losses = {}
    for target in (None, [0.999]):
        torch.manual_seed(1)
        model = handwriting_model(boundary_rate_target=target, boundary_rate_weight=5.0)
        logged = {}
        model.log = lambda name, value, **k: logged.__setitem__(name, value)  # noqa: B023
        losses[str(target)] = model.training_step((inputs, targets, mask), 0).item()
        _, out = model(inputs)
        if target is not None:
            expected = rate_penalty(out.boundary_logits, target, 5.0, mask).item()
            assert logged["train/rate_penalty"].item() == pytest.approx(expected)
            assert losses[str(target)] == pytest.approx(losses["None"] + expected, rel=1e-5)
    assert losses["[0.999]"] > losses["None"]


class _Clipped(torch.nn.Module):
    """What clip_gradients_by_default reads of a LightningModule, clipping as Lightning does."""

    def __init__(self, grads):
        super().__init__()
        self.weights = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros_like(g)) for g in grads])
        for p, g in zip(self.weights, grads):
            p.grad = g.clone()
        self.hparams = SimpleNamespace(grad_clip_norm=1.0)
        self.trainer = SimpleNamespace(is_global_zero=True, global_step=7)

    def clip_gradients(self, optimizer, value, algorithm):
        torch.nn.utils.clip_grad_norm_(self.parameters(), value)

    def grads(self):
        return [p.grad for p in self.weights]


def test_a_norm_that_overflows_float32_is_clipped_in_float64_not_zeroed(capsys):
    """Every entry finite, their float32 norm inf: torch's clipping zeroes the step; here it keeps
    the direction and gets length 1 (float32 entries: to 1e-6), said once."""
    grads = [torch.tensor([3e19, -4e19, 1.0]), torch.tensor([[1e20, 0.0]])]
    plain = _Clipped(grads)
    torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
    assert all((g == 0).all() for g in plain.grads())  # what happened before
    model = _Clipped(grads)
    clip_gradients_by_default(model, None, None, None)
    flat = torch.cat([g.flatten() for g in model.grads()]).double()
    expected = torch.cat([g.flatten() for g in grads]).double()
    expected = expected / expected.norm()
    assert torch.allclose(flat, expected, rtol=1e-6, atol=1e-12) and abs(float(flat.norm()) - 1.0) < 1e-6
    clip_gradients_by_default(model, None, None, None)  # a second overflow is clipped and not said again
    err = capsys.readouterr().err
    assert err.count("overflows float32") == 1 and "at step 7 (1.12e+20, every entry finite)" in err


def test_a_norm_in_range_is_clipped_exactly_as_before_and_an_infinite_entry_is_left_alone():
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(5, 3, generator=gen) * 10, torch.randn(4, generator=gen)]
    model, reference = _Clipped(grads), _Clipped(grads)
    clip_gradients_by_default(model, None, None, None)
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
    assert all(torch.equal(a, b) for a, b in zip(model.grads(), reference.grads()))
    bad = _Clipped([torch.tensor([float("inf"), 1.0])])
    clip_gradients_by_default(bad, None, None, None)  # FaultDetection's case: torch's clipping runs (inf x 0)
    assert torch.isnan(bad.grads()[0][0]) and bad.grads()[0][1] == 0
