"""Bad input through the real ``hmrnn`` entry point: each case exits 2 with one ``hmrnn: error:``
line naming the problem and where, no traceback, and no run folder left behind."""

import functools
import os
import sys

import pytest
import torch

from hmrnn_lightning import HMStack, StepEstimator
from hmrnn_lightning.cli import main
from hmrnn_lightning.heads import MixtureDensityHead
from hmrnn_lightning.models import HandwritingModel
from tests.helpers import ROOT, TINY

QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")


def run(capfd, root, *args):
    """``hmrnn`` with ``args``; returns (exit code, stderr lines that are not Lightning's info lines)."""
    code = main(list(args))
    err = capfd.readouterr().err
    # Lightning's own INFO lines (seed, accelerators) may precede the error; they are not ours
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("Seed set to", "GPU available", "TPU available"))]
    assert "Traceback" not in err, err
    return code, lines


def runs_left(root):
    return sorted(p.name for p in root.rglob("version_*"))


def fit_args(tmp_path, *extra):
    return ["fit", *TINY, f"--trainer.default_root_dir={tmp_path / 'root'}", f"--data.init_args.cache_dir={tmp_path / 'cache'}",
            "--trainer.max_steps=1", "--trainer.limit_val_batches=1", *extra]


def _overlay(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return ["-c", str(path)]


NO_FORWARD = "from hmrnn_lightning.estimators.base import BoundaryEstimator\n\n\nclass NoForward(BoundaryEstimator):\n    pass\n"

# (id, extra arguments or a function of tmp_path giving them, words the one line must hold)
CONFIG_CASES = [
    ("hidden_sizes_zero", ["--model.init_args.stack.init_args.hidden_sizes=[0]"], ["model.init_args.stack", "hidden_sizes", "positive", "[0]"]),
    ("hidden_sizes_empty", ["--model.init_args.stack.init_args.hidden_sizes=[]"], ["model.init_args.stack", "hidden_sizes", "non-empty", "[]"]),
    ("seq_len_zero", ["--data.init_args.seq_len=0"], ["data", "seq_len", "positive", "0"]),
    ("batch_size_negative", ["--data.init_args.batch_size=-1"], ["data", "batch_size", "positive", "-1"]),
    ("embedding_dim_zero", ["--model.init_args.embedding_dim=0"], ["model", "embedding_dim", "positive", "0"]),
    ("a_max_zero", lambda t: _overlay(t, "a0.yaml", "trainer:\n  callbacks:\n    - class_path: SlopeAnnealing\n      init_args: {a_max: 0}\n"),
     ["trainer.callbacks[0]", "SlopeAnnealing", "a_max", "> 0", "0.0"]),
    ("a_max_negative", lambda t: _overlay(t, "an.yaml", "trainer:\n  callbacks:\n    - class_path: hmrnn_lightning.callbacks.SlopeAnnealing\n      init_args: {a_max: -2}\n"),
     ["trainer.callbacks[0]", "a_max", "-2"]),
    ("slope_negative", ["--model.init_args.stack.init_args.estimator.init_args.slope=-1"], ["model.init_args.stack.init_args.estimator", "StepEstimator", "slope", "positive", "-1"]),
    ("unknown_cell", ["--model.init_args.stack.init_args.cell=hm_gru"], ["model.init_args.stack", "hm_gru", "hm_lstm", "hm_rnn"]),
    ("wrong_type_flag", ["--data.init_args.batch_size=abc"], ["data.init_args.batch_size", "int", "abc"]),
    ("wrong_type_file", lambda t: _overlay(t, "ty.yaml", "data:\n  init_args:\n    batch_size: abc\n"), ["data.init_args.batch_size", "int", "abc"]),
    ("no_such_module", ["--model.init_args.stack.init_args.estimator=nosuch_pkg.mod.Thing"], ["model.init_args.stack.init_args.estimator", "nosuch_pkg"]),
    ("unknown_short_name", ["--model.init_args.stack.init_args.estimator=stepp"], ["estimator", "stepp", "bernoulli", "step"]),
    ("unknown_name_in_file", lambda t: _overlay(t, "un.yaml", "data:\n  class_path: ptbb\n"), ["data", "ptbb", "synthetic"]),
    ("unknown_name_flag", ["--data=ptbb"], ["data", "unknown name 'ptbb'", "synthetic"]),
    ("unknown_model_class", ["--model=HMRNNLanguageModl"], ["model", "HMRNNLanguageModl", "HMRNNLanguageModel", "HandwritingModel"]),
    ("unknown_key", ["--model.init_args.stak.init_args.hidden_sizes=[3]"], ["stak"]),
    # the class's own parser reports only "save_dir"; the line must say whose
    ("logger_without_its_required_argument", ["--trainer.logger=lightning.pytorch.loggers.CSVLogger"],
     ["trainer.logger", "CSVLogger", "save_dir"]),
    ("missing_config_file", lambda t: ["-c", str(t / "nope.yaml")], ["nope.yaml", "does not exist"]),
    ("estimator_without_forward", ["--model.init_args.stack.init_args.estimator=hmrnn_test_noforward.NoForward"],
     ["model.stack.estimator", "NoForward", "forward"]),
    ("root_dir_under_a_file", lambda t: [f"--trainer.default_root_dir={t / 'afile' / 'runs'}"], ["trainer.default_root_dir", "afile", "not a folder"]),
    ("window_longer_than_data", ["--data.init_args.seq_len=5000"], ["seq_len", "5000", "longer"]),
    ("missing_iam_folder", lambda t: ["-c", str(ROOT / "configs" / "iam_hmlstm.yaml"), f"--data.init_args.data_dir={t / 'nowhere'}"],
     ["IAM-OnDB", "nowhere"]),
    ("unknown_encoding", lambda t: ["--data=text", f"--data.init_args.train_file={t / 'a.txt'}", "--data.init_args.encoding=klingon"],
     ["data", "TextDataModule", "encoding", "klingon", "unknown"]),
    ("text_to_text_codec", lambda t: ["--data=text", f"--data.init_args.train_file={t / 'a.txt'}", "--data.init_args.encoding=rot13"],
     ["data", "TextDataModule", "encoding", "rot13", "not a text encoding"]),
    ("bytes_to_bytes_codec", lambda t: ["--data=text", f"--data.init_args.train_file={t / 'a.txt'}", "--data.init_args.encoding=base64"],
     ["data", "TextDataModule", "encoding", "base64", "not a text encoding"]),
    ("binary_file_as_text8", lambda t: _text8(t, "text8", b"the cat sat " * 40 + b"\x89PNG\r\n" + b"x" * 100),
     ["text8", "not Text8", "byte 480", "0x89"]),
    ("truncated_zip_as_text8", lambda t: _text8(t, "text8.zip", b"PK\x03\x04" + b"\x00" * 200), ["text8.zip", "truncated zip archive"]),
    ("binary_file_as_text", lambda t: ["--data=text", f"--data.init_args.train_file={_write(t / 'b.txt', b'abc ' * 9 + bytes([0xC3, 0x28]))}"],
     ["b.txt", "not valid utf-8 text", "byte 36"]),
]


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def _text8(tmp_path, name, data):
    """Arguments for a Text8 run whose folder holds ``data`` as ``name``."""
    (tmp_path / "t8").mkdir()
    _write(tmp_path / "t8" / name, data)
    return ["--data=text8", f"--data.init_args.data_dir={tmp_path / 't8'}", "--data.init_args.split_sizes=[300, 50, 50]"]


@pytest.mark.parametrize("case", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_config_error_is_one_line(case, tmp_path, capfd, monkeypatch):
    name, extra, words = case
    (tmp_path / "afile").write_text("a file where a folder is expected\n")
    (tmp_path / "a.txt").write_text("some text for a text datamodule\n" * 50)
    (tmp_path / "hmrnn_test_noforward.py").write_text(NO_FORWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    extra = extra(tmp_path) if callable(extra) else extra
    code, lines = run(capfd, tmp_path, *fit_args(tmp_path, *extra))
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("hmrnn: error: "), lines
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert not runs_left(tmp_path), runs_left(tmp_path)


def test_debug_mode_keeps_the_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("HMRNN_DEBUG", "1")
    with pytest.raises(ValueError, match="hidden_sizes"):
        main(fit_args(tmp_path, "--model.init_args.stack.init_args.hidden_sizes=[0]"))


def test_a_bug_stays_a_traceback(tmp_path, monkeypatch):
    """A ValueError that is not a component's check of its arguments is not passed off as the user's."""
    from hmrnn_lightning.models import language_model

    def broken(self, batch, batch_idx):
        a, b, c = (1, 2)  # the kind of bug the old check reported as a user error  # noqa: F841

    monkeypatch.setattr(language_model.HMRNNLanguageModel, "training_step", broken)
    with pytest.raises(ValueError, match="not enough values to unpack"):
        main(fit_args(tmp_path))


# -- checkpoints given to test / validate / fit -------------------------------------------------------


def _checkpoints(tmp_path, good):
    data = good.read_bytes()
    (tmp_path / "empty.ckpt").write_bytes(b"")
    (tmp_path / "truncated.ckpt").write_bytes(data[: len(data) // 3])
    (tmp_path / "random.ckpt").write_bytes(os.urandom(4096))
    state = torch.load(good, map_location="cpu", weights_only=True)
    state["state_dict"]["head.out.bias" if "head.out.bias" in state["state_dict"] else "embedding.weight"].fill_(float("inf"))
    torch.save(state, tmp_path / "inf.ckpt")
    model = HandwritingModel(
        stack=functools.partial(HMStack, hidden_sizes=[4, 4], estimator=StepEstimator()),
        head=functools.partial(MixtureDensityHead, num_components=2, embed_dim=4),
    )
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": {"_class_path": "hmrnn_lightning.models.HandwritingModel"}},
               tmp_path / "hw.ckpt")


CKPT_CASES = [
    ("missing", "missing.ckpt", "no such file"),
    ("empty", "empty.ckpt", "empty"),
    ("truncated", "truncated.ckpt", "truncated or corrupt"),
    ("random", "random.ckpt", "not a PyTorch checkpoint"),
    ("non_finite", "inf.ckpt", "NaN or infinite"),
    ("handwriting_for_language", "hw.ckpt", "handwriting model"),
]


# every case through `test`; `validate` and `fit` take the same path, checked with two cases each
CKPT_RUNS = [("test", c) for c in CKPT_CASES] + [(cmd, c) for cmd in ("validate", "fit") for c in CKPT_CASES if c[0] in ("missing", "handwriting_for_language")]


@pytest.mark.parametrize("command,case", CKPT_RUNS, ids=[f"{cmd}-{c[0]}" for cmd, c in CKPT_RUNS])
def test_bad_checkpoint_is_one_line(case, command, tmp_path, capfd, lm_ckpt):
    name, file, words = case
    _checkpoints(tmp_path, lm_ckpt)
    args = fit_args(tmp_path, f"--ckpt_path={tmp_path / file}")
    args[0] = command
    code, lines = run(capfd, tmp_path, *args)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("hmrnn: error: checkpoint ") and str(tmp_path / file) in lines[0] and words in lines[0], lines
    assert not runs_left(tmp_path)


def test_checkpoint_of_other_data_is_one_line(tmp_path, capfd, lm_ckpt):
    """The README's old trap: a checkpoint tested with data of another vocabulary."""
    text = tmp_path / "other.txt"
    text.write_text("0123456789+-*/= " * 400)
    code, lines = run(capfd, tmp_path, "test", *TINY, "--data=text", f"--data.init_args.train_file={text}",
                      f"--data.init_args.cache_dir={tmp_path / 'c'}", f"--trainer.default_root_dir={tmp_path / 'root'}", f"--ckpt_path={lm_ckpt}")
    assert code == 2 and len(lines) == 1 and "vocabulary" in lines[0] and str(lm_ckpt) in lines[0], lines
    assert not runs_left(tmp_path)


@pytest.mark.parametrize("command", ["test", "validate"])
def test_good_checkpoint_evaluates_without_a_new_run_folder(command, tmp_path, lm_ckpt, recwarn):
    """test/validate print their results; they make no version_N folder and do not warn that the
    checkpoint folder changed."""
    code = main([command, *TINY, f"--data.init_args.cache_dir={tmp_path / 'c'}", f"--trainer.default_root_dir={tmp_path / 'root'}",
                 f"--ckpt_path={lm_ckpt}", "--trainer.limit_test_batches=1", "--trainer.limit_val_batches=1"])
    assert code == 0
    assert not [w for w in recwarn if "dirpath has changed" in str(w.message)]
    assert not runs_left(tmp_path) and not (tmp_path / "root" / "config.yaml").exists()


def test_a_config_with_a_learning_rate_monitor_runs_without_a_logger(tmp_path, capfd):
    """configs/cpu/*.yaml list a LearningRateMonitor; --trainer.logger=false made Lightning stop the
    fit with a traceback (it has nowhere to log)."""
    code, lines = run(capfd, tmp_path, *fit_args(tmp_path, "--trainer.logger=false",
                                                 "--trainer.callbacks+=lightning.pytorch.callbacks.LearningRateMonitor"))
    assert code == 0, lines


@pytest.mark.skipif(sys.platform == "win32" or os.geteuid() == 0, reason="permission bits do not bind root")
def test_read_only_root_dir(tmp_path, capfd):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        code, lines = run(capfd, tmp_path, *fit_args(tmp_path, f"--trainer.default_root_dir={ro / 'runs'}"))
    finally:
        ro.chmod(0o700)
    assert code == 2 and len(lines) == 1 and "trainer.default_root_dir" in lines[0] and "cannot write" in lines[0]


def test_diverged_training_is_one_line(tmp_path, capfd):
    """FaultDetection's message on a NaN loss reaches the user as the one line; exit code 1, since
    the input was valid and training itself failed. No checkpoint holds a non-finite weight."""
    code, lines = run(capfd, tmp_path, *fit_args(tmp_path, "--model.init_args.lr=1e20", "--model.init_args.grad_clip_norm=null",
                                                  "--trainer.max_steps=5"))
    assert code == 1 and len(lines) == 1, lines
    assert lines[0].startswith("hmrnn: error: training stopped at step") and "nan" in lines[0]
    for path in tmp_path.rglob("*.ckpt"):
        state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]  # our own test file
        assert all(torch.isfinite(v).all() for v in state.values() if torch.is_tensor(v) and v.is_floating_point()), path


# -- the data cache ------------------------------------------------------------------------------------


def test_full_disk_while_caching_is_one_line(tmp_path, capfd, monkeypatch):
    """The disk holding the cache fills up while an entry is written (np.save raising ENOSPC, as
    a real full disk does): one line naming the cache folder and how to move it, nothing left."""
    import errno

    import numpy as np

    def full(path, *args, **kwargs):
        open(path, "wb").close()
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", full)
    code, lines = run(capfd, tmp_path, *fit_args(tmp_path))
    assert code == 2 and len(lines) == 1, lines
    assert f"no space left for the data cache in {tmp_path / 'cache'}" in lines[0] and "HMRNN_CACHE_DIR" in lines[0], lines
    assert list((tmp_path / "cache").iterdir()) == []
    assert not runs_left(tmp_path)


def test_damaged_cache_that_cannot_be_rebuilt_is_one_line(tmp_path, capfd, monkeypatch):
    from hmrnn_lightning.data import SyntheticDataModule
    from hmrnn_lightning.data.base import DataError

    dm = SyntheticDataModule(num_chars=6000, words_per_slot=3, batch_size=4, seq_len=20,
                             cache_dir=str(tmp_path / "cache"))  # the tiny quickstart's corpus
    dm.prepare_data()  # the entry the tiny run opens
    (dm.cache_path / "train.npy").write_bytes(b"\x93NUMPY")

    def gone(self):
        raise DataError("file not found: /data/source.txt")

    monkeypatch.setattr(SyntheticDataModule, "read_splits", gone)
    code, lines = run(capfd, tmp_path, *fit_args(tmp_path))
    lines = [line for line in lines if not line.startswith("hmrnn: the data cache entry")]  # the notice before the attempt
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"hmrnn: error: the data cache entry {dm.cache_path} is damaged") and "delete that folder" in lines[0], lines
    assert not runs_left(tmp_path)
