"""FaultDetection: a forced NaN stops the run with one message; no checkpoint holds a NaN."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from hmrnn_lightning.callbacks import FaultDetection, LostRank, TrainingFault, TrainingHealth
from hmrnn_lightning.callbacks.fault_detection import describe_parameter
from hmrnn_lightning.data.streams import StreamWindows
from tests.helpers import tiny_model


class PoisonGradient(pl.Callback):
    """Writes a NaN into one gradient at the given optimizer steps."""

    def __init__(self, steps, name="stack.cells.1.bottom_up.weight"):
        self.steps, self.name = set(steps), name

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step in self.steps:
            dict(pl_module.named_parameters())[self.name].grad[0, 0] = float("nan")


def fit(tmp_path, callbacks, steps=12, model=None):
    model = model or tiny_model()
    data = DataLoader(StreamWindows(torch.randint(0, 11, (4 * 10 * 30 + 1,)), 4, 10, drop_last=True), batch_size=None)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_last=True, save_top_k=-1)
    trainer = pl.Trainer(
        max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, callbacks=[ckpt, *callbacks], default_root_dir=tmp_path,
    )
    return model, trainer, lambda: trainer.fit(model, data)


def all_finite(path) -> bool:
    state = torch.load(path, map_location="cpu", weights_only=False)  # our own test files["state_dict"]
    return all(torch.isfinite(v).all() for v in state.values() if torch.is_tensor(v) and v.is_floating_point())


def test_forced_nan_gradient_stops_with_step_and_layer(tmp_path):
    model, trainer, run = fit(tmp_path, [PoisonGradient({5}), FaultDetection()])
    with pytest.raises(TrainingFault) as err:
        run()
    message = str(err.value)
    assert "step 5" in message and "nan" in message
    assert "stack.cells.1.bottom_up.weight (layer 2)" in message
    assert "\n" not in message
    # the optimizer step was not taken: the weights in memory are finite
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # every checkpoint written is finite, and last.ckpt is from before the fault
    written = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    assert written and all(all_finite(p) for p in written)
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)  # our own test files
    assert last["global_step"] == 4


def test_skip_mode_skips_and_counts(tmp_path):
    guard = FaultDetection(action="skip")
    model, trainer, run = fit(tmp_path, [PoisonGradient({3, 7}), guard], steps=10)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    run()
    assert guard.skipped == 2
    assert trainer.global_step == 10
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())  # it did train


def test_skip_mode_stops_after_too_many_in_a_row(tmp_path):
    guard = FaultDetection(action="skip", max_consecutive_skips=3)
    _, _, run = fit(tmp_path, [PoisonGradient(range(2, 20)), guard])
    with pytest.raises(TrainingFault, match="3 steps in a row"):
        run()


def test_overflowing_update_stops_and_no_checkpoint_holds_it(tmp_path):
    """lr 1e20: finite gradients, an update that overflows the weights within a few steps."""
    model = tiny_model(lr=1e20, grad_clip_norm=None)
    _, trainer, run = fit(tmp_path, [FaultDetection()], steps=30, model=model)
    with pytest.raises(TrainingFault, match="training stopped at step"):
        run()
    for path in (tmp_path / "ckpt").glob("*.ckpt"):
        assert all_finite(path), path


def test_checkpoint_with_a_non_finite_weight_is_refused(tmp_path):
    guard = FaultDetection()
    trainer = pl.Trainer(logger=False, default_root_dir=tmp_path)
    with pytest.raises(TrainingFault, match=r"refused to write a checkpoint.*stack\.cells\.0\.bias \(layer 1\) is inf"):
        guard.on_save_checkpoint(trainer, None, {"state_dict": {"stack.cells.0.bias": torch.tensor([1.0, float("inf")])}})
    guard.on_save_checkpoint(trainer, None, {"state_dict": {"stack.cells.0.bias": torch.ones(2)}})  # finite: fine


def test_the_model_brings_its_callbacks_unless_configured(tmp_path):
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.loggers import CSVLogger

    model = tiny_model()
    model.trainer = pl.Trainer(logger=False, callbacks=[FaultDetection(action="skip")])
    assert [type(cb) for cb in model.configure_callbacks()] == [TrainingHealth, LostRank]  # the user's FaultDetection stays
    model.trainer = pl.Trainer(logger=CSVLogger(tmp_path))  # with a logger, the learning rate is logged too
    brought = model.configure_callbacks()
    assert [type(cb) for cb in brought] == [FaultDetection, TrainingHealth, LostRank, LearningRateMonitor]
    assert brought[-1].logging_interval == "step"  # a division shows at its step, not at the epoch's end


def test_describe_parameter_names_the_layer():
    assert describe_parameter("stack.cells.2.recurrent.weight") == "stack.cells.2.recurrent.weight (layer 3)"
    assert describe_parameter("head.logits.bias") == "head.logits.bias"


def test_training_health_logs_operations_and_grad_norm(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    model = tiny_model()
    data = DataLoader(StreamWindows(torch.randint(0, 11, (4 * 10 * 30 + 1,)), 4, 10, drop_last=True), batch_size=None)
    trainer = pl.Trainer(
        max_steps=6, logger=CSVLogger(tmp_path), enable_progress_bar=False, enable_checkpointing=False,
        limit_val_batches=0, callbacks=[TrainingHealth(every_n_steps=2)], log_every_n_steps=1,
    )
    trainer.fit(model, data)
    import csv

    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    logged = [r for r in rows if r.get("health/grad_norm")]
    assert [int(r["step"]) for r in logged] == [0, 2, 4]
    assert all(float(r["health/grad_norm"]) > 0 for r in logged)
    with_ops = [r for r in rows if r.get("health/update_frac/l2")]
    assert len(with_ops) == 3
    for r in with_ops:
        fractions = [float(r[f"health/{k}_frac/l2"]) for k in ("update", "copy", "flush")]
        assert abs(sum(fractions) - 1.0) < 1e-6
        assert 0.0 <= float(r["health/unnested/l2"]) <= float(r["health/boundary_rate/l2"]) + 1e-9

