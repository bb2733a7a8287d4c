"""The slope schedules: per epoch, per step, and an epoch schedule expressed in steps."""

from types import SimpleNamespace

import pytest
import torch

from hmrnn_lightning import StepEstimator
from hmrnn_lightning.callbacks import SlopeAnnealing


def slope_after(callback, step=0, epoch=0):
    module = torch.nn.Sequential(StepEstimator())
    trainer = SimpleNamespace(global_step=step, current_epoch=epoch)
    callback.on_train_epoch_start(trainer, module)
    callback.on_train_batch_start(trainer, module, None, 0)
    return float(module[0].slope)


def test_step_schedule_of_the_cpu_configs_reaches_5_at_step_400():
    cb = SlopeAnnealing(a_max=5.0, rate=0.01, interval="step")
    assert slope_after(cb, step=200) == pytest.approx(3.0)
    assert slope_after(cb, step=400) == pytest.approx(5.0)


def test_the_papers_epoch_schedule_in_steps():
    cb = SlopeAnnealing(a_max=5.0, rate=0.04, interval="step", steps_per_epoch=1567)
    assert slope_after(cb, step=400) == pytest.approx(1 + 0.04 * 400 / 1567)  # 1.0102, not 5
    assert slope_after(cb, step=1567 * 25) == pytest.approx(2.0)  # as the epoch schedule at epoch 25
    assert slope_after(cb, step=1567 * 100) == pytest.approx(5.0)
    assert slope_after(cb, step=1567 * 100 + 1) == pytest.approx(5.0)
    # the epoch schedule it expresses changes only at epoch starts
    assert slope_after(SlopeAnnealing(rate=0.04), epoch=25) == pytest.approx(2.0)


@pytest.mark.parametrize("kwargs", [{"steps_per_epoch": 100}, {"steps_per_epoch": 0, "interval": "step"}])
def test_steps_per_epoch_needs_step_interval_and_a_positive_count(kwargs):
    with pytest.raises(ValueError, match="steps_per_epoch must be a positive count and goes with interval: step"):
        SlopeAnnealing(**kwargs)
