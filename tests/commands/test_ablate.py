"""hmrnn ablate: one W&B run per run in one group, seeds summarised, best checkpoints, one quiet summary."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml

from hmrnn_lightning.cli import main

ROOT = Path(__file__).resolve().parents[2]
BUDGET = ["--max_steps", "4", "--val_every", "2"]


def _overlay(tmp_path) -> Path:
    overlay = tmp_path / "no_ln.yaml"
    overlay.write_text("model:\n  init_args:\n    stack:\n      init_args:\n        layer_norm: false\n")
    return overlay


def test_ablate_each_run_its_own_wandb_run_in_one_group(tiny_configs, tmp_path, monkeypatch, capsys):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    hm, _ = tiny_configs
    logs = tmp_path / "wandb_logs"
    logger = ["--trainer.logger=lightning.pytorch.loggers.WandbLogger", f"--trainer.logger.init_args.save_dir={logs}",
              "--trainer.logger.init_args.project=hmrnn-test"]
    out = tmp_path / "abl"
    code = main(["ablate", "--base", str(hm), "--overlays", str(_overlay(tmp_path)), "--name", "grp-test", *BUDGET,
                 "--out", str(out), "--", *logger])
    assert code == 0
    printed = capsys.readouterr().out
    assert [line for line in printed.splitlines() if line.startswith("hmrnn: run ")] == [
        "hmrnn: run 1/2: base seed 0", "hmrnn: run 2/2: no_ln seed 0"]
    assert "Test metric" not in printed and "DataLoader 0" not in printed  # no per-run test table
    assert printed.count("| base | 1 |") == 1 and printed.count("| no_ln | 1 |") == 1  # one summary at the end
    assert "| base | l1" in printed and "| base | l3" not in printed  # and the boundaries of each layer with a detector

    runs = sorted(out.glob("*/wandb/offline-run-*"), key=lambda r: r.parent.parent.name != "base-seed0")
    assert len(runs) == 2  # one W&B run per run, not one for all, each inside --out
    assert not logs.exists()  # the logger config's save_dir is not used by a series
    recorded = [next(r.glob("*.wandb")).read_bytes() for r in runs]
    assert b"base-seed0" in recorded[0] and b"no_ln-seed0" not in recorded[0]  # each run named after itself
    assert b"no_ln-seed0" in recorded[1] and b"base-seed0" not in recorded[1]
    assert all(b"grp-test" in data for data in recorded)
    rows = list(csv.DictReader((out / "runs.csv").open()))
    assert all("last" not in r["checkpoint"] and r["checkpoint"].endswith(".ckpt") for r in rows)


def test_ablate_seeds_mean_and_spread(tiny_configs, tmp_path, capsys):
    hm, _ = tiny_configs
    out = tmp_path / "abl"
    assert main(["ablate", "--base", str(hm), "--seeds", "0", "1", *BUDGET, "--out", str(out)]) == 0
    assert "hmrnn: run 2/2: base seed 1" in capsys.readouterr().out
    rows = list(csv.DictReader((out / "runs.csv").open()))
    assert [(r["label"], r["seed"]) for r in rows] == [("base", "0"), ("base", "1")]
    bpcs = [float(r["test/bpc"]) for r in rows]
    summary = list(csv.DictReader((out / "results.csv").open()))
    assert [(s["label"], s["n"]) for s in summary] == [("base", "2")]
    assert float(summary[0]["test/bpc_mean"]) == pytest.approx(sum(bpcs) / 2)
    assert float(summary[0]["test/bpc_sd"]) == pytest.approx(abs(bpcs[0] - bpcs[1]) / 2 ** 0.5)


def test_ablate_without_validation_tests_last_weights_with_a_note(tiny_configs, tmp_path, capsys):
    hm, _ = tiny_configs
    out = tmp_path / "abl"
    assert main(["ablate", "--base", str(hm), "--max_steps", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "hmrnn: note: base-seed0: no best checkpoint" in printed
    row = next(csv.DictReader((out / "runs.csv").open()))
    assert row["checkpoint"] == "" and float(row["test/bpc"]) > 0


def test_ablate_missing_overlay_is_one_line(tiny_configs, tmp_path, capsys):
    hm, _ = tiny_configs
    with pytest.raises(SystemExit) as exc:
        main(["ablate", "--base", str(hm), "--overlays", str(tmp_path / "nope.yaml")])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"hmrnn: error: config not found: {tmp_path / 'nope.yaml'}"]


def _callbacks(*configs):
    callbacks = None
    for cfg in configs:
        data = yaml.safe_load((ROOT / cfg).read_text())
        callbacks = data.get("trainer", {}).get("callbacks", callbacks)
    return callbacks


def test_no_annealing_overlay_drops_only_the_annealing():
    base = _callbacks("configs/ptb_step_anneal.yaml")
    overlaid = _callbacks("configs/ptb_step_anneal.yaml", "configs/ablations/no_annealing.yaml")
    annealing = [cb for cb in base if cb["class_path"].endswith(".SlopeAnnealing")]
    assert annealing  # the base anneals, so the overlay has something to drop
    assert overlaid == [cb for cb in base if cb not in annealing]  # everything else, settings included


def test_a_diverging_run_is_recorded_and_the_series_goes_on(tiny_configs, tmp_path, capsys):
    hm, _ = tiny_configs
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  init_args:\n    lr: 1.0e+30\n")  # NaN loss within a step or two
    out = tmp_path / "abl"
    assert main(["ablate", "--base", str(hm), "--no-baseline", "--overlays", str(bad), str(_overlay(tmp_path)), *BUDGET,
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "hmrnn: run 2/2: no_ln seed 0" in printed and "hmrnn: note: bad-seed0: training stopped at step" in printed
    bad_row, good_row = list(csv.DictReader((out / "runs.csv").open()))
    assert bad_row["test/bpc"] == "nan" and "no finite checkpoint to test" in bad_row["note"]
    assert float(good_row["test/bpc"]) > 0 and good_row["note"] == ""
    assert "| bad | 1 | nan |" in (out / "results.md").read_text()  # not a number passed off as one
