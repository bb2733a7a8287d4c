"""The hmrnn command: every config parses, tiny runs fit, plugins resolve, bad input exits cleanly."""

import os
import subprocess
import sys
import warnings

import pytest
import torch
import yaml

from hmrnn_lightning.cli import HMRNNCLI, main
from tests.helpers import ROOT, tiny, write_iam_tree

CONFIGS = sorted([*(ROOT / "configs").glob("*.yaml"), *(ROOT / "configs" / "cpu").glob("*.yaml")])
OVERLAYS = sorted(p for sub in ("ablations", "logger", "trainer") for p in (ROOT / "configs" / sub).glob("*.yaml"))
def print_config(args, capsys):
    assert main(args + ["--print_config"]) == 0
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_config_parses(config, capsys):
    assert config.read_text().startswith(f"# hmrnn fit --config {config.relative_to(ROOT).as_posix()}")
    cfg = print_config(["fit", "--config", str(config)], capsys)
    assert cfg["model"]["class_path"].startswith("hmrnn_lightning.")


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_overlay_applies_to_the_ptb_config(overlay, capsys):
    base = ROOT / "configs" / "ptb_step_anneal.yaml"
    first_line = overlay.read_text().splitlines()[0]
    assert first_line.startswith("# hmrnn fit --config configs/")
    cfg = print_config(["fit", "--config", str(base), "--config", str(overlay)], capsys)
    stack = cfg["model"]["init_args"]["stack"]["init_args"]
    assert stack["hidden_sizes"] == [512, 512, 512]  # the base survives the overlay
    if overlay.name == "no_layer_norm.yaml":
        assert stack["layer_norm"] is False
    if overlay.name == "estimator_soft.yaml":
        assert stack["estimator"]["class_path"] == "hmrnn_lightning.estimators.SoftEstimator"


def test_short_names_become_full_class_paths(capsys):
    args = ["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--model.init_args.stack.init_args.estimator=bernoulli"]
    cfg = print_config(args, capsys)
    assert cfg["model"]["init_args"]["stack"]["init_args"]["estimator"]["class_path"] == "hmrnn_lightning.estimators.BernoulliEstimator"
    cfg = print_config(args + ["--data=ptb"], capsys)
    assert cfg["data"]["class_path"] == "hmrnn_lightning.data.PTBDataModule"


def test_fit_tiny_run_saves_config_and_checkpoint(tmp_path, capsys):
    cli = HMRNNCLI(args=["fit", *tiny(tmp_path, "--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2")])
    assert cli.trainer.global_step == 3
    out = capsys.readouterr().out  # the fit ends with the last validation's figures per layer
    assert "val results" in out and "F1 phrase" in out and "F1 sentence" in out and "best layer" in out, out[-2000:]
    assert out.rstrip().splitlines()[-2].lstrip().startswith("l1 ")
    assert cli.model.vocab == cli.datamodule.vocab.symbols  # linked from the data
    saved = list(tmp_path.rglob("config.yaml"))
    assert saved and "hmrnn_lightning.estimators.StepEstimator" in saved[0].read_text()
    assert "val/bpc" in cli.trainer.callback_metrics


def test_resume_continues_step_count_and_slope(tmp_path):
    args = tiny(tmp_path, "--trainer.limit_train_batches=4", "--trainer.limit_val_batches=1")
    first = HMRNNCLI(args=["fit", *args, "--trainer.max_epochs=2"])
    assert first.trainer.global_step == 8
    ckpt = next(tmp_path.rglob("last.ckpt"))
    second = HMRNNCLI(args=["fit", *args, "--trainer.max_epochs=3", f"--ckpt_path={ckpt}"])
    assert second.trainer.global_step == 12
    assert float(second.model.estimator.slope) == pytest.approx(1 + 0.5 * 2)  # quickstart: rate 0.5, epoch 2
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert state["hmrnn_vocab"] == first.datamodule.vocab.symbols


def test_bf16_mixed_on_cpu(tmp_path):
    cli = HMRNNCLI(args=["fit", *tiny(tmp_path, "--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1", "--trainer.precision=bf16-mixed")])
    assert cli.trainer.global_step == 3
    assert torch.isfinite(cli.trainer.callback_metrics["val/bpc"])


def test_sample_from_checkpoint(tmp_path, capsys):
    HMRNNCLI(args=["fit", *tiny(tmp_path, "--trainer.max_steps=2", "--trainer.limit_val_batches=1")])
    ckpt = next(tmp_path.rglob("last.ckpt"))
    assert main(["sample", f"--ckpt_path={ckpt}", "--prime", "ab", "--length", "30", "--seed", "0"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("ab") and len(out) >= 32


def _fake_install(tmp_path, monkeypatch, name, target):
    """Make an entry point visible to importlib.metadata exactly as `pip install` would."""
    dist = tmp_path / "site" / f"{name}-0.1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1.0\n")
    (dist / "entry_points.txt").write_text(f"[hmrnn_lightning.estimators]\n{name.split('-')[-1]} = {target}\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))


def test_plugin_found_by_short_name(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "plugins" / "hmrnn-gumbel" / "src"))
    _fake_install(tmp_path, monkeypatch, "hmrnn-gumbel", "hmrnn_gumbel:GumbelSigmoidEstimator")
    assert main(["list", "estimators"]) == 0
    assert "gumbel" in capsys.readouterr().out
    cli = HMRNNCLI(args=["fit", *tiny(tmp_path, "--trainer.max_steps=2", "--trainer.limit_val_batches=1",
                                      "--model.init_args.stack.init_args.estimator=gumbel")])
    assert type(cli.model.estimator).__name__ == "GumbelSigmoidEstimator"


LOOSE_ESTIMATOR = """from hmrnn_lightning.estimators import StepEstimator


class MyEstimator(StepEstimator):
    calls = 0

    def forward(self, logit):
        MyEstimator.calls += 1
        return super().forward(logit)
"""


def test_estimator_in_a_loose_file_of_the_working_folder(tmp_path, monkeypatch):
    """``my_est.MyEstimator`` resolves from ./my_est.py without PYTHONPATH=. (as the console script runs)."""
    (tmp_path / "my_est.py").write_text(LOOSE_ESTIMATOR)
    monkeypatch.chdir(tmp_path)
    # the hmrnn script's sys.path: neither '' nor the working folder (pytest's may hold either)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "my_est", raising=False)
    try:
        assert main(["fit", *tiny(tmp_path, "--trainer.max_steps=1", "--trainer.limit_val_batches=1",
                                  "--model.init_args.stack.init_args.estimator=my_est.MyEstimator")]) == 0
        assert sys.modules["my_est"].MyEstimator.calls > 0  # the run used the local class
    finally:
        sys.modules.pop("my_est", None)


def test_broken_plugin_gives_one_message(tmp_path, monkeypatch, capsys):
    _fake_install(tmp_path, monkeypatch, "hmrnn-broken", "no_such_module_xyz:Thing")
    code = main(["fit", *tiny(tmp_path, "--model.init_args.stack.init_args.estimator=broken")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) <= 2  # the plugin warning and the error
    assert "broken" in err and "no_such_module_xyz" in err


def test_bad_input_exits_with_a_message(tmp_path, capsys):
    assert main(["fit", *tiny(tmp_path, "--model.init_args.stak.init_args.hidden_sizes=[3]")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hmrnn: error:") and "stak" in err and "usage:" not in err
    typo = tmp_path / "typo.yaml"
    typo.write_text("trainer:\n  max_epochz: 3\n")
    code = main(["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--config", str(typo)])
    err = capsys.readouterr().err
    assert code == 2 and "max_epochz" in err and len(err.splitlines()) == 1
    assert main(["fit", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    code = main(["fit", "--config", str(ROOT / "configs" / "ptb_step.yaml"),
                 f"--data.init_args.data_dir={tmp_path / 'nowhere'}", "--trainer.max_steps=1"])
    err = capsys.readouterr().err
    assert code == 2 and "ptb.char.train.txt" in err and "Traceback" not in err
    assert main(["list", "gadgets"]) == 2


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path):
    """A real two-process gloo run through the console script."""
    # one thread per rank: two ranks on a 2-core machine must not oversubscribe it
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "hmrnn_lightning.cli", "fit", *tiny(tmp_path, "--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2",
           "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu",
           # CSV named here: with tensorboard installed (a dependency) the default logger is TensorBoard
           "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.init_args.save_dir={tmp_path}")]
    # the timeout only guards against a hang: two ranks starting on a loaded 2-core machine can take minutes
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (proc.stdout + proc.stderr).count("hmrnn: the stack runs impl=sequence on cpu") == 1  # rank 0 only
    metrics = list(tmp_path.rglob("metrics.csv"))
    assert metrics and "val/bpc" in metrics[0].read_text()


def test_wandb_logger_offline(tmp_path, monkeypatch):
    """The W&B overlay logs offline (no account, no network): config, BPC, slope, boundary rates."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    cli = HMRNNCLI(args=["fit", *tiny(tmp_path, "--config", str(ROOT / "configs" / "logger" / "wandb.yaml"),
                                      f"--trainer.logger.init_args.save_dir={tmp_path}",
                                      "--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1",
                                      "--trainer.log_every_n_steps=1")])
    assert type(cli.trainer.logger).__name__ == "WandbLogger"
    cli.trainer.logger.experiment.finish()
    runs = list(tmp_path.rglob("offline-run-*"))
    assert runs, "no offline W&B run written"
    history = list(runs[0].rglob("*.wandb"))
    assert history and history[0].stat().st_size > 0
    assert "val/bpc" in cli.trainer.callback_metrics and "train/slope" in cli.trainer.callback_metrics


def test_two_wandb_runs_keep_two_configs(tmp_path, monkeypatch):
    """Each W&B run saves its config in its own folder (beside its checkpoints), and the logger gets
    the settings once, without the vocabulary or the CLI's bookkeeping keys."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    logged = []
    from lightning.pytorch.loggers import WandbLogger

    original = WandbLogger.log_hyperparams
    monkeypatch.setattr(WandbLogger, "log_hyperparams", lambda self, params, *a, **k: (logged.append(params), original(self, params, *a, **k))[1])
    folders = []
    for lr in (0.003, 0.004):
        cli = HMRNNCLI(args=["fit", *tiny(tmp_path, "--config", str(ROOT / "configs" / "logger" / "wandb.yaml"),
                                          f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}", f"--model.init_args.lr={lr}",
                                          "--trainer.max_steps=2", "--trainer.limit_val_batches=1")])
        cli.trainer.logger.experiment.finish()
        folders.append(next(p for p in (tmp_path / "runs").rglob("config.yaml") if p.parent not in folders).parent)
    assert folders[0] != folders[1]
    assert [yaml.safe_load((f / "config.yaml").read_text())["model"]["init_args"]["lr"] for f in folders] == [0.003, 0.004]
    assert not (tmp_path / "runs" / "config.yaml").exists()  # no shared, overwritten file
    assert len(logged) == 2  # once per run
    for params in logged:
        model_args = params["model"]["init_args"]
        assert "vocab" not in model_args and "_instantiator" not in model_args and "_class_path" not in model_args


def _iam_args(tmp_path):

    write_iam_tree(tmp_path, n_lines=30)
    return [
        f"--data.init_args.data_dir={tmp_path}", f"--data.init_args.cache_dir={tmp_path / 'cache'}",
        "--data.init_args.min_length=60", "--data.init_args.max_length=70", "--data.init_args.batch_size=4",
        "--model.init_args.stack.init_args.hidden_sizes=[8, 8, 8]",
        "--model.init_args.head.init_args.num_components=2", "--model.init_args.head.init_args.embed_dim=8",
        f"--trainer.default_root_dir={tmp_path / 'run'}", "--trainer.accelerator=cpu",
    ]


@pytest.mark.parametrize("flag", ["-c", "--config"])
def test_config_flag_links_handwriting_stats(tmp_path, flag):
    """-c is --config: the IAM config links the data's offset statistics to the model either way."""
    with pytest.warns(UserWarning):  # the generated tree holds two bad files on purpose
        cli = HMRNNCLI(args=[flag, str(ROOT / "configs" / "iam_hmlstm.yaml"), *_iam_args(tmp_path)], run=False)
    assert type(cli.model).__name__ == "HandwritingModel"
    assert cli.model.stats is not None and cli.model.stats == cli.datamodule.stats
    assert cli.model.hparams.stats == cli.datamodule.stats  # so checkpoints carry them


@pytest.mark.parametrize("flag", ["-c", "--config"])
def test_short_names_in_config_files(tmp_path, flag, capsys):
    """Registered short names work in config files given either way, and saved configs hold full paths."""
    alias = tmp_path / "alias.yaml"
    alias.write_text(
        "model:\n  init_args:\n    stack:\n      class_path: hm\n      init_args:\n        estimator: {class_path: soft}\n"
        "data:\n  class_path: synthetic\n"
    )
    cfg = print_config(["fit", flag, str(ROOT / "configs" / "quickstart.yaml"), flag, str(alias)], capsys)
    stack = cfg["model"]["init_args"]["stack"]
    assert stack["class_path"].endswith(".HMStack") and stack["class_path"].startswith("hmrnn_lightning.")
    assert stack["init_args"]["estimator"]["class_path"] == "hmrnn_lightning.estimators.SoftEstimator"
    assert cfg["data"]["class_path"] == "hmrnn_lightning.data.SyntheticDataModule"
    args = tiny(tmp_path, "--trainer.max_steps=1", "--trainer.limit_val_batches=1")
    args[:2] = [flag, str(ROOT / "configs" / "quickstart.yaml"), flag, str(alias)]
    cli = HMRNNCLI(args=["fit", *args])
    assert cli.model.vocab == cli.datamodule.vocab.symbols  # the vocabulary link holds with -c too
    saved = next(tmp_path.rglob("config.yaml")).read_text()
    assert "class_path: hm\n" not in saved and "hmrnn_lightning.estimators.SoftEstimator" in saved


def test_integer_batch_limits_stay_counts(capsys):
    """--trainer.limit_val_batches 1 is one batch (an int), 0.5 half of them (a float)."""
    cfg = print_config(["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--trainer.limit_val_batches", "1",
                        "--trainer.limit_train_batches=0.5"], capsys)
    assert cfg["trainer"]["limit_val_batches"] == 1 and isinstance(cfg["trainer"]["limit_val_batches"], int)
    assert cfg["trainer"]["limit_train_batches"] == 0.5


def test_run_stopped_before_its_first_validation(tmp_path):
    """max_steps ends training before any validation: early stopping on val/bpc does not crash, no
    monitor warning, and last.ckpt is still written."""
    stop = tmp_path / "stop.yaml"
    stop.write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning.pytorch.callbacks.EarlyStopping\n"
        "      init_args: {monitor: val/bpc, mode: min, patience: 5}\n"
        "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        "      init_args: {monitor: val/bpc, mode: min, save_last: true}\n"
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = HMRNNCLI(args=["fit", *tiny(tmp_path, "--config", str(stop), "--trainer.max_steps=2")])
    assert cli.trainer.global_step == 2
    assert not [w for w in caught if "could not find the monitored key" in str(w.message)]
    assert list(tmp_path.rglob("last.ckpt"))


def test_help_fits_on_a_screen_and_points_onwards(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) <= 40
    for command in ("fit", "test", "sample", "list", "plot-boundaries"):
        assert f"\n  {command} " in out
    assert "hmrnn fit --config configs/quickstart.yaml" in out
    assert main(["fit", "--help"]) == 0
    head = " ".join(" ".join(capsys.readouterr().out.splitlines()[:12]).split())
    assert "--print_config" in head and "hmrnn list" in head
    assert main(["fit", "--model.help", "HMRNNLanguageModel"]) == 0
    assert "stateful truncated BPTT" in capsys.readouterr().out  # the class docstring
    # the evaluation commands' --help names the same flags; they need no checkpoint to answer
    assert main(["validate", "--model.help", "HMRNNLanguageModel"]) == 0
    assert "stateful truncated BPTT" in capsys.readouterr().out
    assert main(["test", "--data.help=PTBDataModule"]) == 0
    assert "PTBDataModule" in capsys.readouterr().out


def test_version(capsys):
    import hmrnn_lightning

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"hmrnn-lightning {hmrnn_lightning.__version__}"


def test_light_commands_do_not_import_lightning():
    """--help, --version and list answer without loading torch or Lightning (they took 5-7 s)."""
    code = "import sys; from hmrnn_lightning.cli import main; [main(a) for a in (['--help'], ['--version'], ['list'])]; " \
           "print(sorted(m for m in ('torch', 'lightning') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
