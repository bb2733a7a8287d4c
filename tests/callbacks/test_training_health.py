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


def _optimizer_steps(health: TrainingHealth, norms: list[float]):
    """``len(norms)`` optimizer steps of Adam on one weight whose gradient has the given norms,
    with the hooks in Lightning's order; returns the module, the optimizer and the weights after
    each step (``after[k]``: after ``k`` steps)."""
    module = torch.nn.Linear(4, 1, bias=False)
    optimizer = torch.optim.Adam(module.parameters(), lr=0.1)
    trainer = SimpleNamespace(global_step=0, is_global_zero=True, loggers=[], optimizers=[optimizer])
    after = [module.weight.detach().clone()]
    for step, norm in enumerate(norms):
        trainer.global_step = step
        module.weight.grad = torch.full((1, 4), norm / 2.0)  # norm of four equal entries
        health.on_before_optimizer_step(trainer, module, optimizer)
        optimizer.step()
        trainer.global_step = step + 1
        health.on_train_batch_end(trainer, module, {"loss": torch.tensor(0.0)}, None, step)
        after.append(module.weight.detach().clone())
    return module, optimizer, after


def test_rollback_restores_the_snapshot_from_before_the_first_spike_and_lowers_the_rate(capsys):
    gen = torch.Generator().manual_seed(0)
    calm = (0.4 + 0.2 * torch.rand(200, generator=gen)).tolist()
    # spikes at steps 125, 127, 129: the third makes the explosion; 125 - 50 = 75 -> the snapshot of step 50
    norms = calm[:125] + [30.0, 0.5, 40.0, 0.5, 50.0] + calm[:20]
    health = TrainingHealth(on_explosion="rollback", explosion_history=50, snapshot_every=50, rollback_lr_factor=0.5)
    module, optimizer, after = _optimizer_steps(health, norms)
    assert health.exploded == 129 and health.rollbacks == [(129, 50)]
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    # the weights went back to those after step 50, then moved on by the 20 calm steps after the rollback
    assert torch.equal(after[130], after[50])
    assert not torch.equal(after[-1], after[50])
    err = capsys.readouterr().err
    assert "in 3 of the last 10 steps; rolling back to step 50" in err
    assert "rolled back at step 129 to the weights and optimizer state of step 50, learning rate now 0.05 (rollback 1 of at most 3)" in err
    # an explosion before any snapshot is old enough is said, and nothing is rolled back
    health = TrainingHealth(on_explosion="rollback", explosion_history=50, snapshot_every=50)
    _, _, early = _optimizer_steps(health, calm[:60] + [30.0, 40.0, 50.0] + calm[:5])
    assert health.exploded == 62 and health.rollbacks == []
    assert not any(torch.equal(w, early[50]) for w in early[51:])
    err = capsys.readouterr().err
    assert "no snapshot from 50 steps before step 60 to roll back to; clipping bounds" in err and "rolled back" not in err
    # nor one within the first explosion_history steps (200 by default), in the turbulence of the start
    health = TrainingHealth(on_explosion="rollback")
    _optimizer_steps(health, calm[:180] + [30.0, 40.0, 50.0])
    assert health.exploded == 182 and health.rollbacks == [] and "no snapshot" in capsys.readouterr().err
    # a lone spike (step 155) holds back no snapshot more than 10 steps after it (200, 250)
    health = TrainingHealth(on_explosion="rollback", explosion_history=50, snapshot_every=50)
    _optimizer_steps(health, calm[:155] + [30.0] + calm[:100] + [30.0, 40.0, 50.0])
    assert health.rollbacks == [(258, 200)]


def test_rollback_goes_no_further_than_max_rollbacks_and_warn_mode_never_touches_the_weights(capsys):
    gen = torch.Generator().manual_seed(2)
    calm = (0.4 + 0.2 * torch.rand(200, generator=gen)).tolist()
    burst = [30.0, 40.0, 50.0]
    norms = calm[:120] + burst + calm[:60] + burst + calm[:10]
    health = TrainingHealth(on_explosion="rollback", explosion_history=50, max_rollbacks=1)
    _, optimizer, after = _optimizer_steps(health, norms)
    assert [step for step, _ in health.rollbacks] == [122]  # the second burst (step 185) is only reported
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    err = capsys.readouterr().err
    assert "rollback 1 of at most 1" in err
    assert "the gradient is exploding at step 185" in err and "no rollback left (max_rollbacks: 1)" in err
    warn = TrainingHealth()
    _, optimizer, after = _optimizer_steps(warn, norms)
    assert warn.exploded == 122 and warn.rollbacks == [] and optimizer.param_groups[0]["lr"] == 0.1
    assert not any(torch.equal(after[k], after[50]) for k in range(51, len(after)))  # never back to a snapshot
    lines = [l for l in capsys.readouterr().err.splitlines() if "exploding" in l]
    assert len(lines) == 1 and "rolling back" not in lines[0]


def test_bad_rollback_settings_are_one_error():
    with pytest.raises(ValueError, match="on_explosion must be 'warn' or 'rollback'"):
        TrainingHealth(on_explosion="restart")
    with pytest.raises(ValueError, match="0 < rollback_lr_factor <= 1"):
        TrainingHealth(rollback_lr_factor=0.0)


def _tiny_fit(tmp_path, health: TrainingHealth, blowup_steps: range = range(0)):
    """110 steps of a 2 x 8 HM-LSTM on synthetic text with ``health``; gradients multiplied by 1e4
    at ``blowup_steps``. Returns the trainer, the model and the weights after each step."""
    import lightning.pytorch as pl

    from hmrnn_lightning.data import SyntheticDataModule
    from tests.helpers import tiny_model

    after: dict[int, list[torch.Tensor]] = {}

    class Blowup(pl.Callback):
        def on_before_optimizer_step(self, trainer, module, optimizer):
            if trainer.global_step in blowup_steps:
                for p in module.parameters():
                    if p.grad is not None:
                        p.grad.mul_(1e4)

    class Weights(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            after[trainer.global_step] = [p.detach().clone() for p in module.parameters()]

    torch.manual_seed(0)
    dm = SyntheticDataModule(num_chars=3000, batch_size=2, seq_len=20, cache_dir=str(tmp_path / "cache"))
    model = tiny_model(vocab_size=dm.vocab_size, hidden=8, layers=2, lr=0.003)
    trainer = pl.Trainer(max_steps=110, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, accelerator="cpu", num_sanity_val_steps=0, limit_val_batches=0,
                         callbacks=[Blowup(), health, Weights()], default_root_dir=tmp_path)
    trainer.fit(model, dm)
    return trainer, model, after


def test_a_fit_rolls_back_a_planted_explosion_and_trains_on(tmp_path):
    """In a real fit: gradients blown up 1e4 times at steps 80-84 are an explosion at step 82; the
    model goes back to its weights of step 60 (the newest snapshot 20 steps before the first spike),
    the learning rate is halved, and training goes on to max_steps with finite weights. Without an
    explosion the snapshots change nothing: the same fit in ``warn`` mode ends with the same weights."""
    health = TrainingHealth(on_explosion="rollback", explosion_history=50, snapshot_every=20)
    trainer, model, after = _tiny_fit(tmp_path, health, range(80, 85))
    assert health.exploded == 82 and health.rollbacks == [(82, 60)]
    # the rollback ran in TrainingHealth's hook of step 82's batch, before `Weights` recorded it
    assert all(torch.equal(a, b) for a, b in zip(after[83], after[60]))
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0015)
    assert trainer.global_step == 110 and all(torch.isfinite(p).all() for p in model.parameters())

    calm_rollback = TrainingHealth(on_explosion="rollback", explosion_history=50, snapshot_every=20)
    _, _, with_snapshots = _tiny_fit(tmp_path, calm_rollback)
    _, _, plain = _tiny_fit(tmp_path, TrainingHealth())
    assert calm_rollback.exploded is None and calm_rollback.rollbacks == []
    assert all(torch.equal(a, b) for a, b in zip(with_snapshots[110], plain[110]))
