"""TrainingHealth's collapse watch: a dead layer is said once, with its layer and step."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from hmrnn_lightning.callbacks import TrainingHealth


def _windows(health: TrainingHealth, steps: int, rates: list[float], seed: int = 0) -> None:
    """Feeds ``steps`` training windows [4, 50, layers] whose layer k fires with probability ``rates[k]``."""
    gen = torch.Generator().manual_seed(seed)
    trainer = SimpleNamespace(global_step=0, is_global_zero=True, loggers=[])
    for step in range(steps):
        trainer.global_step = step + 1  # after the batch's optimizer step
        z = (torch.rand(4, 50, len(rates), generator=gen) < torch.tensor(rates)).float()
        ops = torch.zeros(4, 50, len(rates), 3)
        health.on_train_batch_end(trainer, None, {"loss": torch.tensor(0.0), "boundaries": z, "operations": ops}, None, step)


def test_a_planted_dead_layer_is_reported_once_with_layer_and_step(capsys):
    health = TrainingHealth(collapse_window=20)
    # layer 1 healthy, layer 2 never fires, layer 3 (the top: no detector) always 0
    _windows(health, 60, [0.3, 0.0, 0.0])
    assert health.collapsed == {2: 19}
    lines = [l for l in capsys.readouterr().err.splitlines() if "collapsed" in l]
    assert lines == ["hmrnn: warning: layer 2 collapsed at step 19: its boundary rate over the last 20 steps was 0.0%, "
                     "below 1%: a dead level of the hierarchy"]


def test_an_always_firing_layer_is_dead_too_and_a_healthy_or_short_run_is_not(capsys):
    health = TrainingHealth(collapse_window=20)
    _windows(health, 60, [1.0, 0.2, 0.0])
    assert health.collapsed == {1: 19}
    assert "was 100.0%, above 99%" in capsys.readouterr().err
    health = TrainingHealth(collapse_window=20)
    _windows(health, 19, [0.0, 0.2, 0.0])  # out of range, but for fewer steps than the window
    _windows(health, 60, [0.2, 0.05, 0.0], seed=1)  # low rates, but above 1%
    assert health.collapsed == {}
    assert "collapsed" not in capsys.readouterr().err


def test_a_layer_firing_nearly_always_is_dead_though_some_windows_dip_under_the_edge():
    """At 99.4% some windows of 200 symbols fall under 99% (three misses or more): judged window
    by window, the run of out-of-range windows kept starting again and the layer was never called
    collapsed; over the pooled windows it is. A layer at 97% is not."""
    health = TrainingHealth(collapse_window=100)
    _windows(health, 100, [0.994, 0.97, 0.0])
    assert health.collapsed == {1: 99}


def test_bad_collapse_settings_are_one_error():
    with pytest.raises(ValueError, match="collapse_window >= 1"):
        TrainingHealth(collapse_window=0)
    with pytest.raises(ValueError, match="collapse_rate < 0.5"):
        TrainingHealth(collapse_rate=0.6)


def _gradient_steps(health: TrainingHealth, norms: list[float]) -> None:
    """Steps whose single parameter's gradient has the given norms."""
    module = torch.nn.Linear(4, 1, bias=False)
    trainer = SimpleNamespace(global_step=0, is_global_zero=True)
    for step, norm in enumerate(norms):
        trainer.global_step = step
        g = torch.ones(1, 4)
        module.weight.grad = g * (norm / float(g.norm()))
        health.on_before_optimizer_step(trainer, module, None)


def test_an_exploding_gradient_is_reported_once_with_step_and_ratio(capsys):
    gen = torch.Generator().manual_seed(0)
    calm = (0.4 + 0.2 * torch.rand(100, generator=gen)).tolist()
    health = TrainingHealth()
    # one spike alone, then calm, then three spikes within ten steps (and a non-finite norm, left to FaultDetection)
    _gradient_steps(health, calm + [30.0] + calm[:20] + [float("inf"), 8.0, 0.5, 50.0, 0.6, 370.0, 400.0] + calm[:20])
    assert health.exploded == 126
    lines = [l for l in capsys.readouterr().err.splitlines() if "exploding" in l]
    assert len(lines) == 1 and lines[0].startswith("hmrnn: warning: the gradient is exploding at step 126: norm 370, ")
    assert "in 3 of the last 10 steps" in lines[0]


def test_calm_or_noisy_gradients_and_a_short_history_are_not_an_explosion(capsys):
    gen = torch.Generator().manual_seed(1)
    health = TrainingHealth()
    _gradient_steps(health, (0.1 + 3.0 * torch.rand(400, generator=gen)).tolist())  # noisy, within 30x of the median
    early = TrainingHealth()
    _gradient_steps(early, [0.5] * 10 + [50.0] * 5)  # spikes before 50 steps of history are not judged
    assert health.exploded is None and early.exploded is None
    assert "exploding" not in capsys.readouterr().err
    with pytest.raises(ValueError, match="explosion_factor > 1"):
        TrainingHealth(explosion_factor=1.0)
