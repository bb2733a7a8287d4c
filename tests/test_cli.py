"""The hmrnn command: every config parses, tiny runs fit, plugins resolve, bad input exits cleanly."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from hmrnn_lightning.cli import HMRNNCLI, main, rewrite_argv

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml"))
OVERLAYS = sorted(p for sub in ("ablations", "logger", "trainer") for p in (ROOT / "configs" / sub).glob("*.yaml"))
TINY = [
    "--config", str(ROOT / "configs" / "quickstart.yaml"),
    "--data.init_args.num_chars=6000", "--data.init_args.batch_size=4", "--data.init_args.seq_len=20",
    "--model.init_args.embedding_dim=8",
    "--model.init_args.stack.init_args.hidden_sizes=[12, 12]",
    "--model.init_args.head.init_args.embed_dim=12",
    "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.accelerator=cpu",
]


def tiny(tmp_path, *extra):
    return TINY + [f"--trainer.default_root_dir={tmp_path}", f"--data.init_args.cache_dir={tmp_path / 'cache'}", *extra]


def print_config(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args + ["--print_config"])
    assert exc.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_parses(config, capsys):
    assert config.read_text().startswith(f"# hmrnn fit --config configs/{config.name}")
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
    assert rewrite_argv(["--data=ptb"]) == ["--data=hmrnn_lightning.data.PTBDataModule"]


def test_fit_tiny_run_saves_config_and_checkpoint(tmp_path):
    cli = HMRNNCLI(args=["fit", *tiny(tmp_path, "--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2")])
    assert cli.trainer.global_step == 3
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


def test_broken_plugin_gives_one_message(tmp_path, monkeypatch, capsys):
    _fake_install(tmp_path, monkeypatch, "hmrnn-broken", "no_such_module_xyz:Thing")
    code = main(["fit", *tiny(tmp_path, "--model.init_args.stack.init_args.estimator=broken")])
    err = capsys.readouterr().err
    assert code != 0
    assert "broken" in err and "no_such_module_xyz" in err


def test_bad_input_exits_with_a_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fit", *tiny(tmp_path, "--model.init_args.stak.init_args.hidden_sizes=[3]")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("hmrnn: error:") and "stak" in err and "usage:" not in err
    typo = tmp_path / "typo.yaml"
    typo.write_text("trainer:\n  max_epochz: 3\n")
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--config", str(typo)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "max_epochz" in err and len(err.splitlines()) < 10
    assert main(["fit", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    code = main(["fit", "--config", str(ROOT / "configs" / "ptb_step.yaml"),
                 f"--data.init_args.data_dir={tmp_path / 'nowhere'}", "--trainer.max_steps=1"])
    err = capsys.readouterr().err
    assert code == 2 and "ptb.char.train.txt" in err and "Traceback" not in err
    assert main(["list", "gadgets"]) == 2


def test_ddp_two_cpu_processes(tmp_path):
    """A real two-process gloo run through the console script."""
    # one thread per rank: two ranks on a 2-core machine must not oversubscribe it
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "hmrnn_lightning.cli", "fit", *tiny(tmp_path, "--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=2",
           "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu")]
    # the timeout only guards against a hang: two ranks starting on a loaded 2-core machine can take minutes
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
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
    assert "val/bpc" in cli.trainer.callback_metrics and "slope" in cli.trainer.callback_metrics


def test_ablate_writes_csv_and_markdown_tables(tmp_path, capsys):
    overlay = tmp_path / "no_ln.yaml"
    overlay.write_text("model:\n  init_args:\n    stack:\n      init_args:\n        layer_norm: false\n")
    base = tmp_path / "base.yaml"
    base.write_text((ROOT / "configs" / "quickstart.yaml").read_text())
    extra = TINY[2:] + [f"--data.init_args.cache_dir={tmp_path / 'cache'}", "--trainer.max_epochs=1",
                        "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1"]
    code = main(["ablate", "--base", str(base), "--overlays", str(overlay), "--out", str(tmp_path / "abl"), "--", *extra])
    assert code == 0
    rows = (tmp_path / "abl" / "results.csv").read_text().splitlines()
    assert rows[0] == "run,overlay,val_bpc,test_bpc" and len(rows) == 3
    assert all(float(r.split(",")[2]) > 0 and float(r.split(",")[3]) > 0 for r in rows[1:])
    assert "| no_ln |" in (tmp_path / "abl" / "results.md").read_text()
