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
    assert lines == ["hmrnn: warning: layer 2 collapsed at step 19: its boundary rate has stayed below 1% since step 0 "
                     "(20 steps), a dead level of the hierarchy"]


def test_an_always_firing_layer_is_dead_too_and_a_healthy_or_short_run_is_not(capsys):
    health = TrainingHealth(collapse_window=20)
    _windows(health, 60, [1.0, 0.2, 0.0])
    assert health.collapsed == {1: 19}
    assert "stayed above 99%" in capsys.readouterr().err
    health = TrainingHealth(collapse_window=20)
    _windows(health, 19, [0.0, 0.2, 0.0])  # out of range, but for fewer steps than the window
    _windows(health, 60, [0.2, 0.05, 0.0], seed=1)  # low rates, but above 1%
    assert health.collapsed == {}
    assert "collapsed" not in capsys.readouterr().err


def test_bad_collapse_settings_are_one_error():
    with pytest.raises(ValueError, match="collapse_window >= 1"):
        TrainingHealth(collapse_window=0)
    with pytest.raises(ValueError, match="collapse_rate < 0.5"):
        TrainingHealth(collapse_rate=0.6)
