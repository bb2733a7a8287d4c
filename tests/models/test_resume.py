"""Kill-and-resume is exact: a real ``hmrnn fit`` killed with SIGKILL mid-epoch and resumed from
``last.ckpt`` logs the same per-step losses as a run that was never interrupted."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hmrnn_lightning.data import SyntheticDataModule
from tests.helpers import fit_subprocess as fit
from tests.helpers import step_checkpoints as checkpoints
from tests.helpers import ROOT, tiny_model

def step_losses(root: Path) -> dict[int, float]:
    """``train/bpc`` by global step from every CSV log written under ``root``."""
    out: dict[int, float] = {}
    for path in sorted(root.rglob("metrics.csv")):
        with open(path) as f:
            for row in csv.DictReader(f):
                if row.get("train/bpc"):
                    out[int(row["step"])] = float(row["train/bpc"])
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, float]:
    """The per-step losses of the uninterrupted run."""
    whole = tmp_path_factory.mktemp("whole") / "root"
    fit(whole)
    losses = step_losses(whole)
    assert len(losses) == 66  # 2 epochs of 33 steps
    return losses


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_the_uninterrupted_run(tmp_path, reference):

    # kill -9 once last.ckpt holds step 40 (7 steps into the second epoch; the quickstart's
    # LastCheckpoint saves every 20 steps): the run is then busy with later steps or checkpoints,
    # as a crash would find it. last.ckpt is replaced atomically, so reading it here is safe.
    killed = tmp_path / "killed"
    proc = fit(killed, wait=False)
    deadline = time.monotonic() + 1800

    def last_step() -> int:
        last = next(killed.rglob("last.ckpt"), None)
        return -1 if last is None else torch.load(last, map_location="cpu", weights_only=True)["global_step"]

    while last_step() < 40:
        assert proc.poll() is None, f"the run ended before it could be killed:\n{proc.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, "no last.ckpt at step 40 within 1800 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    last = next(killed.rglob("last.ckpt"))
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    resumed_from = ckpt["global_step"]
    assert 33 < resumed_from < 66 and resumed_from % 20 == 0  # mid-way through the second epoch
    assert ckpt["hmrnn_carried_state"] is not None  # the TBPTT state travels with the checkpoint
    assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["position"] == resumed_from - 33

    resumed = tmp_path / "resumed"
    fit(resumed, f"--ckpt_path={last}")
    after = step_losses(resumed)
    assert sorted(after) == list(range(resumed_from, 66))
    for step, loss in after.items():
        assert loss == reference[step], f"step {step}: resumed {loss} != uninterrupted {reference[step]}"


@pytest.mark.slow
def test_sigterm_saves_exits_nonzero_and_resume_by_folder_is_exact(tmp_path, reference):
    """A scheduler's SIGTERM mid-epoch: the run saves last.ckpt at the step it was on, says how
    to resume and exits 143; `hmrnn fit --resume RUN` goes on in the same folder with the losses of
    the uninterrupted run."""
    root = tmp_path / "root"
    proc = fit(root, wait=False)
    deadline = time.monotonic() + 1800
    while not list(root.rglob("*step=35.ckpt")):  # two steps into the second epoch
        assert proc.poll() is None, f"the run ended before it could be stopped:\n{proc.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 143, out[-3000:]
    last = next(root.rglob("last.ckpt"))
    run_dir = last.parent.parent
    line = [x for x in out.splitlines() if x.startswith("hmrnn: stopped by SIGTERM")]
    assert line and f"resume with: hmrnn fit --resume {run_dir}" in line[0], out[-2000:]
    stopped_at = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    assert 35 <= stopped_at < 66 and f"at step {stopped_at};" in line[0]

    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "WANDB_MODE": "disabled",
           "HMRNN_CACHE_DIR": str(root.parent / "cache")}
    done = subprocess.run([sys.executable, "-m", "hmrnn_lightning.cli", "fit", "--resume", str(run_dir)], env=env,
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [p.name for p in root.rglob("version_*")] == [run_dir.name]  # the same folder, no new one
    after = step_losses(root)  # metrics.csv of the resumed part; the first part is kept as metrics.part1.csv
    assert sorted(after) == list(range(stopped_at, 66))
    for step, loss in after.items():
        assert loss == reference[step], f"step {step}: resumed {loss} != uninterrupted {reference[step]}"
    assert (run_dir / "metrics.part1.csv").is_file()


def test_resume_at_every_kind_of_step_in_process(tmp_path, recwarn):
    """Resuming from the checkpoint of each step of a short run (mid-epoch, an epoch's last step,
    after validation) continues with the same windows and carried state as the uninterrupted run,
    and Lightning neither warns that the loader is not resumable nor that an IterableDataset has a length."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(ckpt_path=None, callbacks=()):
        torch.manual_seed(0)
        dm = SyntheticDataModule(num_chars=1200, batch_size=2, seq_len=20, cache_dir=str(tmp_path / "cache"))
        model = tiny_model(vocab_size=dm.vocab_size, hidden=8, layers=2)
        seen = []

        class Record(pl.Callback):
            def on_train_batch_start(self, trainer, module, batch, batch_idx):
                seen.append((trainer.global_step, batch_idx, batch[0][:, 0].tolist(),
                             None if module._carried["train"] is None or batch_idx == 0
                             else module._carried["train"][0].h.sum().item()))

        trainer = pl.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                             accelerator="cpu", num_sanity_val_steps=0, callbacks=[Record(), *callbacks],
                             default_root_dir=tmp_path)
        trainer.fit(model, dm, ckpt_path=ckpt_path, weights_only=False)  # our own file; hparams hold a partial
        return seen

    saver = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=1, save_top_k=-1, filename="{step}")
    reference = run(callbacks=[saver])
    per_epoch = len(reference) // 2
    assert per_epoch == 27 and [r[1] for r in reference] == list(range(27)) * 2
    for step in (3, per_epoch - 1, per_epoch):  # mid-epoch, an epoch's last step, after validation
        resumed = run(ckpt_path=tmp_path / "ck" / f"step={step}.ckpt")
        assert resumed == reference[step:], f"resumed from step {step}"
    messages = [str(w.message) for w in recwarn]
    assert not [m for m in messages if "not resumable" in m or "`IterableDataset` has `__len__`" in m], messages


def test_every_shipped_config_writes_one_last_ckpt_between_validations():
    import yaml

    for path in sorted((ROOT / "configs").glob("*.yaml")):
        callbacks = yaml.safe_load(path.read_text())["trainer"]["callbacks"]
        names = [c["class_path"].rsplit(".", 1)[-1] for c in callbacks]
        last = [c for c in callbacks if c["class_path"].endswith("LastCheckpoint")]
        assert len(last) == 1 and last[0]["init_args"]["every_n_train_steps"] > 0, f"{path.name}: no step-based last.ckpt"
        # after ModelCheckpoint, so the saved state holds that validation's best-so-far
        assert names.index("LastCheckpoint") > names.index("ModelCheckpoint"), path.name
        assert not any(c.get("init_args", {}).get("save_last") for c in callbacks), f"{path.name}: a second writer of last.ckpt"


@pytest.mark.slow
def test_ddp_resume_restores_each_ranks_windows_and_state(tmp_path):
    """Two gloo ranks: each carries the state of its own streams; a resume from a mid-epoch
    checkpoint gives every rank its own state back (rank 0's logged losses would drift otherwise,
    since the weights depend on both ranks' gradients)."""
    ddp = ["--trainer.strategy=ddp", "--trainer.devices=2", "--data.init_args.num_chars=6000", "--trainer.max_epochs=1"]
    whole = tmp_path / "whole"
    fit(whole, *ddp)
    reference = step_losses(whole)
    # the quickstart's corpus at 6,000 symbols: 90% for training, in 2 ranks x 4 streams, windows of 20
    train = len(SyntheticDataModule(num_chars=6000, words_per_slot=3, batch_size=4, seq_len=20).read_splits()["train"])
    windows = (train // 8 - 1) // 20
    assert windows == 34 and len(reference) == windows
    ckpt_path = next(p for p in checkpoints(whole) if "step=20" in p.name)
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    state = ckpt["hmrnn_carried_state"]
    assert state["world_size"] == 2 and state["layers"][0][0].shape == (2, 4, 12)
    assert not torch.equal(state["layers"][0][0][0], state["layers"][0][0][1])  # two ranks, two states
    resumed = tmp_path / "resumed"
    fit(resumed, *ddp, f"--ckpt_path={ckpt_path}")
    after = step_losses(resumed)
    assert sorted(after) == list(range(20, windows))
    for step, loss in after.items():
        assert loss == reference[step], f"step {step}: resumed {loss} != uninterrupted {reference[step]}"
