"""A run's folder: claimed once, one newest ``last.ckpt``, resumed by folder, evaluated from its own
config; and the commands that would silently evaluate untrained weights or drop a setting refuse."""

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from hmrnn_lightning.cli import main
from hmrnn_lightning.run_folder import claim_version, resolve_run_arguments
from tests.helpers import TINY


def run(capfd, *args):
    code = main(list(args))
    err = capfd.readouterr().err
    assert "Traceback" not in err, err
    ours = [line for line in err.splitlines() if line.startswith("hmrnn:") and not line.startswith(("hmrnn: the stack runs", "hmrnn: training batch"))]
    return code, ours


def fit_args(root, *extra):
    return ["fit", *TINY, f"--trainer.default_root_dir={root}", f"--data.init_args.cache_dir={root.parent / 'cache'}",
            "--trainer.limit_val_batches=1", "--data.init_args.seq_len=5", *extra]


def versions(root):
    return sorted(p.name for p in (root / "lightning_logs").glob("version_*")) if (root / "lightning_logs").is_dir() else []


# -- claiming ---------------------------------------------------------------------------------------


def test_claims_are_distinct_under_a_race(tmp_path):
    got, start = [], threading.Barrier(8)

    def claim():
        start.wait()
        got.append(claim_version(tmp_path, "lightning_logs"))

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(8))
    (tmp_path / "lightning_logs" / "version_11").mkdir()
    assert claim_version(tmp_path, "lightning_logs") == 12  # above the highest, never reusing a gap


@pytest.mark.slow
def test_two_fits_started_at_once_get_their_own_folders(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "hmrnn_lightning.cli", *fit_args(tmp_path / "root", "--trainer.max_steps=2")]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    folders = sorted(line.split("Run folder: ")[1].split(" ")[0] for out in outs for line in out.splitlines() if "Run folder: " in line)
    assert len(set(folders)) == 2, folders
    for folder in map(Path, folders):
        assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["epoch=0-step=2.ckpt", "last.ckpt"] or \
            [p.name for p in (folder / "checkpoints").iterdir()] == ["last.ckpt"], list((folder / "checkpoints").iterdir())
        assert len(list(folder.glob("events.out.tfevents.*"))) == 1  # one process's log per folder


# -- one last.ckpt, the newest ---------------------------------------------------------------------


def test_one_last_ckpt_and_it_is_the_newest(tmp_path, capfd):
    """The quickstart has ModelCheckpoint(val/bpc) and LastCheckpoint(every 20): a 5-step run with
    a validation every 2 steps ends with one last.ckpt at step 5, no last-v1.ckpt."""
    root = tmp_path / "root"
    code, _ = run(capfd, *fit_args(root, "--trainer.max_steps=5", "--trainer.val_check_interval=2"))
    assert code == 0
    ckpts = sorted(p.name for p in (root / "lightning_logs" / "version_0" / "checkpoints").iterdir())
    assert [n for n in ckpts if n.startswith("last")] == ["last.ckpt"], ckpts
    last = torch.load(root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 5


# -- resuming by folder -----------------------------------------------------------------------------


def test_resume_by_folder_goes_on_in_the_same_folder(tmp_path, capfd, recwarn):
    root = tmp_path / "root"
    assert run(capfd, *fit_args(root, "--trainer.max_steps=2"))[0] == 0
    run_dir = root / "lightning_logs" / "version_0"
    code, lines = run(capfd, "fit", "--resume", str(run_dir), "--trainer.max_steps=4")
    assert code == 0, lines
    assert versions(root) == ["version_0"]  # no version_1
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 4
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 2  # the logs go on in the same folder
    messages = [str(w.message) for w in recwarn]
    assert not [m for m in messages if "dirpath has changed" in m or "exists and is not empty" in m], messages
    # --print_config shows the resumed run's settings (it refused --resume before)
    assert main(["fit", "--resume", str(run_dir), "--print_config"]) == 0
    printed = capfd.readouterr().out
    assert "max_steps: 4" in printed and "last.ckpt" in printed, printed[-500:]
    # --resume last: the newest run under the root (given by --trainer.default_root_dir)
    code, _ = run(capfd, "fit", "--resume", "last", f"--trainer.default_root_dir={root}", "--trainer.max_steps=5")
    assert code == 0 and versions(root) == ["version_0"]
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 5


def test_a_fit_stopped_by_max_steps_mid_epoch_resumes_in_that_epoch(tmp_path, capfd):
    """max_steps ends the fit inside epoch 0: last.ckpt must say epoch 0 (saved at on_train_end it
    said 1, and the resumed run started epoch 1 with a per-epoch slope one step on)."""
    root = tmp_path / "root"
    assert run(capfd, *fit_args(root, "--trainer.max_steps=3"))[0] == 0
    last_path = root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"

    def where(path):
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        loop = ckpt["loops"]["fit_loop"]
        return ckpt["epoch"], ckpt["global_step"], loop["epoch_progress"]["current"]["completed"]

    assert where(last_path) == (0, 3, 0)
    code, lines = run(capfd, "fit", "--resume", str(last_path.parent.parent), "--trainer.max_steps=5")
    assert code == 0, lines
    assert where(last_path) == (0, 5, 0)


@pytest.mark.parametrize("make,words", [
    (lambda t: t / "nowhere", "no such run folder"),
    (lambda t: (t / "empty").mkdir() or t / "empty", "not a run folder"),
    (lambda t: ((t / "r").mkdir(), (t / "r" / "config.yaml").write_text("{}"))[0] or t / "r", "nothing to resume"),
    (lambda t: "last", "no run with checkpoints/last.ckpt"),
])
def test_resume_of_no_run_is_one_line(tmp_path, capfd, make, words):
    code, lines = run(capfd, "fit", "--resume", str(make(tmp_path)), f"--trainer.default_root_dir={tmp_path}")
    assert code == 2 and len(lines) == 1 and words in lines[0], lines


def test_fit_ckpt_path_last_resumes_the_newest_run_or_refuses(tmp_path, capfd):
    root = tmp_path / "root"
    code, lines = run(capfd, *fit_args(root, "--trainer.max_steps=2", "--ckpt_path=last"))
    assert code == 2 and len(lines) == 1 and "no run with checkpoints/last.ckpt" in lines[0], lines
    assert run(capfd, *fit_args(root, "--trainer.max_steps=1"))[0] == 0
    assert run(capfd, *fit_args(root, "--trainer.max_steps=2", "--ckpt_path=last"))[0] == 0
    assert versions(root) == ["version_0"]
    last = root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 2


def test_resume_with_other_windows_is_one_line_and_keeps_the_run(tmp_path, capfd):
    root = tmp_path / "root"
    assert run(capfd, *fit_args(root, "--trainer.max_steps=1"))[0] == 0
    run_dir = root / "lightning_logs" / "version_0"
    before = sorted(p.name for p in run_dir.rglob("*"))
    code, lines = run(capfd, "fit", "--resume", str(run_dir), "--data.init_args.batch_size=2", "--trainer.max_steps=3")
    assert code == 2 and len(lines) == 1 and "batch" in lines[0] and "cut differently" in lines[0], lines
    assert versions(root) == ["version_0"]
    assert set(before) <= {p.name for p in run_dir.rglob("*")}  # nothing of the run was removed


# -- evaluating ------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["test", "validate"])
@pytest.mark.parametrize("ckpt", [None, "last", "best"])
def test_evaluating_without_a_checkpoint_is_refused(command, ckpt, tmp_path, capfd):
    extra = [] if ckpt is None else [f"--ckpt_path={ckpt}"]
    code, lines = run(capfd, command, *TINY, f"--trainer.default_root_dir={tmp_path}", *extra)
    assert code == 2 and len(lines) == 1 and "untrained weights" in lines[0], lines


def test_test_reads_the_runs_own_config(tmp_path, capfd, recwarn, lm_ckpt):
    """`hmrnn test --ckpt_path RUN/checkpoints/last.ckpt` alone: the run's config.yaml says which
    model and data; no run folder is made and no warning about the checkpoint's callbacks."""
    runs_before = sorted(lm_ckpt.parent.parent.parent.iterdir())
    code = main(["test", f"--ckpt_path={lm_ckpt}", "--trainer.limit_test_batches=1"])
    out = capfd.readouterr()
    assert code == 0, out.err
    assert "test/bpc" in out.out and "more with --verbose true" in out.out
    assert "test/copy_frac/l1" not in out.out  # the short table, not Lightning's 29 rows
    assert not [w for w in recwarn if "callbacks used to create the checkpoint" in str(w.message)]
    assert sorted(lm_ckpt.parent.parent.parent.iterdir()) == runs_before
    lone = tmp_path / "lone.ckpt"
    lone.write_bytes(lm_ckpt.read_bytes())
    code, lines = run(capfd, "test", f"--ckpt_path={lone}")
    assert code == 2 and len(lines) == 1 and "--config" in lines[0], lines


def test_a_checkpoint_given_before_the_runs_config_is_still_the_one_evaluated(capfd, lm_ckpt):
    """The run's config.yaml says ckpt_path: null; given after --ckpt_path it undid the flag and the
    command evaluated untrained weights with exit 0."""
    config = lm_ckpt.parent.parent / "config.yaml"

    def bpc(*args):
        code = main(["test", *args, "--trainer.limit_test_batches=1"])
        out = capfd.readouterr().out
        assert code == 0
        return [line for line in out.splitlines() if "test/bpc" in line]

    assert bpc(f"--ckpt_path={lm_ckpt}", "--config", str(config)) == bpc("--config", str(config), f"--ckpt_path={lm_ckpt}")
    assert resolve_run_arguments(["fit", "--ckpt_path", "a.ckpt", "--config", "c.yaml"])[0] == [
        "fit", "--config", "c.yaml", "--ckpt_path", "a.ckpt"]


@pytest.mark.parametrize("command", ["test", "validate"])
def test_a_checkpoint_that_is_not_there_is_one_line(command, tmp_path, capfd):
    code, lines = run(capfd, command, f"--ckpt_path={tmp_path / 'nope.ckpt'}")
    assert code == 2 and lines == [f"hmrnn: error: checkpoint {tmp_path / 'nope.ckpt'}: no such file"], lines


def test_a_model_setting_the_checkpoint_contradicts_is_refused(tmp_path, capfd, lm_ckpt):
    code, lines = run(capfd, "test", *TINY, f"--trainer.default_root_dir={tmp_path}", f"--ckpt_path={lm_ckpt}",
                      "--model.init_args.stack.init_args.hidden_sizes=[16, 16]")
    assert code == 2 and len(lines) == 1, lines
    assert "model.init_args.stack.init_args.hidden_sizes" in lines[0] and "[16, 16]" in lines[0] and "[12, 12]" in lines[0], lines


def test_weights_that_do_not_fit_are_one_line(tmp_path, capfd, lm_ckpt):
    ckpt = torch.load(lm_ckpt, map_location="cpu", weights_only=True)
    ckpt["state_dict"].pop("embedding.weight")
    ckpt["state_dict"]["extra.weight"] = torch.zeros(2)
    bad = tmp_path / "bad.ckpt"
    torch.save(ckpt, bad)
    for command in ("test", "validate", "fit"):
        code, lines = run(capfd, command, *TINY, f"--trainer.default_root_dir={tmp_path / 'root'}", f"--ckpt_path={bad}")
        assert code == 2 and len(lines) == 1, (command, lines)
        assert "do not fit" in lines[0] and "embedding.weight" in lines[0] and "extra.weight" in lines[0], lines
    assert not versions(tmp_path / "root")


# -- values accepted with no meaning -----------------------------------------------------------------


@pytest.mark.parametrize("extra,words", [
    (["--trainer.gradient_clip_val=-1"], ["trainer.gradient_clip_val", ">= 0", "-1"]),
    (["--model.init_args.stack.init_args.estimator=tests.test_run_folder.TwoEstimatorPlugin"], ["[0, 1]", "2.0", "TwoEstimatorPlugin"]),
    (["--trainer.val_check_interval=1000"], ["trainer.val_check_interval", "1000"]),
])
def test_values_without_a_meaning_are_one_line(tmp_path, capfd, extra, words):
    root = tmp_path / "root"
    code, lines = run(capfd, *fit_args(root, "--trainer.max_steps=2", *extra))
    assert code == 2 and len(lines) == 1, lines
    assert all(w in lines[0] for w in words), lines
    assert not versions(root)


def _plugin():
    from hmrnn_lightning.estimators.base import BoundaryEstimator

    class TwoEstimatorPlugin(BoundaryEstimator):
        """Returns 2 for every logit."""

        def forward(self, logit):
            return torch.full_like(logit, 2.0)

    TwoEstimatorPlugin.__module__ = __name__
    return TwoEstimatorPlugin


TwoEstimatorPlugin = _plugin()


def test_a_full_disk_is_one_line(tmp_path, capfd, monkeypatch):
    """ENOSPC while a checkpoint is written, as the disk-full run met it: one line naming the
    file, exit 2, and the previous last.ckpt intact (the save was atomic)."""
    import errno

    from hmrnn_lightning import checkpoint_io

    root = tmp_path / "root"
    assert run(capfd, *fit_args(root, "--trainer.max_steps=1"))[0] == 0
    last = root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    before = last.read_bytes()

    def full(obj, f, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")  # as a failed write: no file named

    monkeypatch.setattr(checkpoint_io.torch, "save", full)
    code, lines = run(capfd, "fit", "--resume", str(last.parent.parent), "--trainer.max_steps=2")
    assert code == 2 and len(lines) == 1 and "no space left" in lines[0] and "last.ckpt" in lines[0], lines
    assert last.read_bytes() == before
    assert not list(last.parent.glob(".*tmp*"))


def test_resolve_run_arguments_leaves_other_commands_alone():
    assert resolve_run_arguments(["fit", "--config", "x.yaml"]) == (["fit", "--config", "x.yaml"], None)
    assert resolve_run_arguments(["test", "--help"]) == (["test", "--help"], None)
