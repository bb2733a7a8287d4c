"""hmrnn compare: matched sizes, several seeds, best checkpoints, one table with mean and spread, the probe."""

from __future__ import annotations

import csv
import math

import pytest

from hmrnn_lightning.cli import main
from hmrnn_lightning.commands.runs import markdown_summary, summarise


def test_compare_on_tiny_synthetic_data(tiny_configs, tmp_path, capsys, monkeypatch):
    hm, lstm = tiny_configs
    out = tmp_path / "cmp"
    here = tmp_path / "cwd"
    here.mkdir()
    monkeypatch.chdir(here)  # the parameter counts build CLIs here; they left empty run folders behind
    code = main(["compare", "--hm", str(hm), "--baseline", str(lstm), "--seeds", "3", "--max_steps", "4",
                 "--val_every", "2", "--out", str(out), "--", "--trainer.logger=true"])
    assert code == 0
    assert list(here.rglob("*")) == []
    printed = capsys.readouterr().out
    assert "run 1/2: hm_lstm seed 3" in printed and "run 2/2: ln_lstm seed 3" in printed
    counts = [line for line in printed.splitlines() if line.startswith("hmrnn: parameters:")]
    assert counts, printed
    hm_n, base_n = (int(part.split()[1].replace(",", "")) for part in counts[0].split(":", 2)[2].split(";"))
    assert abs(base_n - hm_n) / hm_n < 0.05  # widths chosen to match the HM-LSTM's count

    runs = list(csv.DictReader((out / "runs.csv").open()))
    assert [(r["label"], r["seed"]) for r in runs] == [("hm_lstm", "3"), ("ln_lstm", "3")]
    for r in runs:
        assert r["checkpoint"].endswith(".ckpt") and "last" not in r["checkpoint"]  # the best-validation checkpoint
        assert r["note"] == ""
        assert 0 < float(r["test/bpc"]) < 10 and float(r["chars_per_s"]) > 0
        assert int(r["params"]) in (hm_n, base_n)
    hm_row, base_row = runs[0], runs[1]
    assert 0 <= float(hm_row["test/boundary_f1_tol1/l1_word"]) <= 1 and hm_row["probe_f1/l1_word"] == ""
    assert base_row["test/boundary_rate/l1"] == "" and base_row["collapsed"] == ""  # an LSTM has no boundaries to report
    assert 0 <= float(hm_row["test/boundary_rate_sep/l1"]) <= 1 and 0 <= float(hm_row["test/boundary_rate_other/l2"]) <= 1
    assert hm_row["collapsed"] == "0" and hm_row["collapsed_at"] == ""
    assert hm_row["exploded_at"] == "" and base_row["exploded_at"] == ""  # TrainingHealth ran on both; neither exploded
    for l in (1, 2, 3):
        assert 0 < float(base_row[f"probe_f1/l{l}_word"]) <= 1 and 0 <= float(base_row[f"probe_ahead1_f1/l{l}_word"]) <= 1

    summary = list(csv.DictReader((out / "compare.csv").open()))
    assert [(s["label"], s["n"]) for s in summary] == [("hm_lstm", "1"), ("ln_lstm", "1")]
    assert float(summary[0]["test/bpc_mean"]) == pytest.approx(float(hm_row["test/bpc"]))
    assert summary[0]["test/bpc_sd"] == ""  # one seed: no spread (mean and sd over seeds: see the summary test)
    md = (out / "compare.md").read_text()
    assert md.startswith("| model | seeds | params | test BPC | equal steps | test BPC at equal steps | equal time (s) |")
    assert "| word F1, best layer | collapsed layers per seed |\n" in md.splitlines(keepends=True)[0]
    assert "| hm_lstm | 1 |" in md and "probe)" in md.splitlines()[3]  # the LSTM's best layer is its probe's
    assert md.splitlines()[2].endswith("| 0 |") and md.splitlines()[3].endswith("|  |")  # collapsed: the HM-LSTM's only
    assert "| hm_lstm | l1" in md and "| hm_lstm | l2" in md and "| ln_lstm | l" not in md  # layers with a detector

    # equal steps: both validated at steps 2 and 4, so both are tested at 4, on the weights kept from then
    for r in runs:
        assert r["equal_steps"] == "4" and 0 < float(r["test_bpc_equal_steps"]) < 10
        assert str(out / f"{r['label']}-seed3" / "curve" / "step=4.ckpt") in r["equal_checkpoints"].split()
    curves = list(csv.DictReader((out / "curves.csv").open()))
    assert [(c["label"], c["step"]) for c in curves] == [("hm_lstm", "2"), ("hm_lstm", "4"), ("ln_lstm", "2"), ("ln_lstm", "4")]
    # equal time: the run that reached its last validation sooner is tested there; the other at its
    # last validation within that time, if it had one
    limit = min(max(float(c["seconds"]) for c in curves if c["label"] == label) for label in ("hm_lstm", "ln_lstm"))
    for r in runs:
        assert float(r["equal_time_s"]) == pytest.approx(limit, abs=0.06)
        within = [c for c in curves if c["label"] == r["label"] and float(c["seconds"]) <= limit]
        assert r["steps_at_equal_time"] == (within[-1]["step"] if within else "")
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    kept = sorted(str(p) for p in out.glob("*/curve/*.ckpt"))
    assert kept == sorted(c for r in runs for c in r["equal_checkpoints"].split())  # the weights not tested are deleted
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))


def test_compare_bad_budget_is_one_line(tiny_configs, tmp_path, capsys):
    hm, lstm = tiny_configs
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--hm", str(hm), "--baseline", str(lstm), "--max_steps", "0", "--out", str(tmp_path / "x")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["hmrnn: error: --max_steps must be positive, got 0"]


def test_summary_mean_and_sample_sd():
    rows = [{"label": "a", "x": 1.0}, {"label": "a", "x": 3.0}, {"label": "b", "x": 2.0}, {"label": "b", "x": ""}]
    s = summarise(rows, ["x"])
    assert s[0] == {"label": "a", "n": 2, "x_mean": 2.0, "x_sd": pytest.approx(math.sqrt(2))}
    assert s[1]["x_mean"] == 2.0 and s[1]["x_sd"] == ""  # one value: no spread to report
    md = markdown_summary(s, ["x"])
    assert "| a | 2 | 2.000 ± 1.414 |" in md and "| b | 2 | 2.000 |" in md


def test_markdown_table_is_the_headline_the_csv_holds_every_column(tmp_path):
    from hmrnn_lightning.commands.compare import write_tables

    hm = {"label": "hm", "params": 100, "steps": 4, "test/bpc": 2.0, "best_val_bpc": 2.1, "chars_per_s": 5000.0,
          "test/boundary_rate/l1": 0.3, "test/boundary_rate/l2": 0.1, "test/boundary_rate/l3": 0.0,
          "test/boundary_f1/l1_word": 0.4, "test/boundary_f1_tol1/l1_word": 0.95}  # a tolerant F1 is not the headline
    rows = [{**hm, "seed": 0, "test/boundary_f1/l2_word": 0.6}, {**hm, "seed": 1, "test/boundary_f1/l2_word": 0.8},
            {"label": "lstm", "seed": 0, "params": 101, "steps": 4, "test/bpc": 2.5, "best_val_bpc": 2.6, "chars_per_s": 9000.0,
             "probe_f1/l1_word": 0.5, "probe_f1/l2_word": 0.3, "probe_f1_tol1/l1_word": 0.97}]
    write_tables(tmp_path, rows)
    md = (tmp_path / "compare.md").read_text().splitlines()
    assert md[0] == "| model | seeds | params | test BPC | train chars/s | word F1, best layer |"
    assert md[2] == "| hm | 2 | 100 | 2.000 ± 0.000 | 5000 ± 0 | 0.700 ± 0.141 (l2) |"
    assert md[3] == "| lstm | 1 | 101 | 2.500 | 9000 | 0.500 (l1, probe) |"
    header = next(csv.reader((tmp_path / "compare.csv").open()))
    for column in ("best_val_bpc", "test/boundary_rate/l1", "test/boundary_f1_tol1/l1_word", "probe_f1/l2_word"):
        assert f"{column}_mean" in header, column
    write_tables(tmp_path, rows, full=True)
    assert "| z word F1 l1 ±1 |" in (tmp_path / "compare.md").read_text()


def test_layer_table_names_the_best_layer_and_skips_the_top_one():
    from hmrnn_lightning.commands.runs import layer_table

    values = {"test/bpc": 2.0, "test/boundary_rate/l1": 0.52, "test/boundary_rate/l2": 0.185, "test/boundary_rate/l3": 0.0,
              "test/boundary_rate_sep/l1": 0.01, "test/boundary_rate_other/l1": 0.65,
              "test/boundary_f1/l1_word": 0.48, "test/boundary_f1/l2_word": 0.942, "test/boundary_precision/l2_word": 0.904}
    lines = layer_table(values, "test").splitlines()
    assert lines[0].split() == ["layer", "rate", "on", "sep", "on", "other", "P", "F1"]
    assert lines[1].split()[:4] == ["l1", "0.520", "0.010", "0.650"] and lines[2].split()[0] == "l2"
    assert len(lines) == 4 and lines[3].strip() == "best layer (highest exact word F1): l2"
    assert layer_table({"test/bpc": 2.0}, "test") == ""  # a stack without boundaries: no table


def test_layer_markdown_mean_and_spread_per_layer():
    from hmrnn_lightning.commands.runs import layer_markdown

    hm = {"label": "hm", "test/boundary_rate/l1": 0.5, "test/boundary_rate/l2": 0.2, "test/boundary_rate/l3": 0.0,
          "test/boundary_f1/l1_word": 0.3}
    rows = [{**hm, "seed": 0, "test/boundary_f1/l2_word": 0.9}, {**hm, "seed": 1, "test/boundary_f1/l2_word": 0.7},
            {"label": "lstm", "seed": 0, "test/bpc": 2.0}]
    md = layer_markdown(rows).splitlines()
    assert md[0] == "| model | layer | rate | F1 |"
    assert md[2] == "| hm | l1 | 0.500 ± 0.000 | 0.300 ± 0.000 |"
    assert md[3] == "| hm | l2 (best) | 0.200 ± 0.000 | 0.800 ± 0.141 |"
    assert len(md) == 4  # no top layer, no LSTM rows


def test_tables_with_a_collapsed_layer(tmp_path):
    """A run whose layer collapsed has ``collapsed_at`` (``l2@305``) beside ``collapsed``: a
    column named exactly, not a prefix of it (the study's compare crashed writing its tables)."""
    from hmrnn_lightning.commands.compare import write_tables

    run = {"label": "hm", "params": 100, "steps": 4, "test/bpc": 2.0, "chars_per_s": 5000.0}
    rows = [{**run, "seed": 0, "collapsed": 1, "collapsed_at": "l2@305"}, {**run, "seed": 1, "collapsed": 0, "collapsed_at": ""}]
    write_tables(tmp_path, rows)
    md = (tmp_path / "compare.md").read_text().splitlines()
    assert md[0].endswith("| collapsed layers per seed |") and md[2].endswith("| 1, 0 |")
    assert "collapsed_at_mean" not in next(csv.reader((tmp_path / "compare.csv").open()))
    assert "Exploding" not in (tmp_path / "compare.md").read_text()


def test_tables_name_the_runs_whose_gradient_exploded(tmp_path):
    """The means include a run that blew up; the tables of compare and ablate say which one."""
    from hmrnn_lightning.commands import ablate, compare

    run = {"label": "hm", "params": 100, "steps": 4, "test/bpc": 2.0, "chars_per_s": 5000.0, "collapsed": 0}
    rows = [{**run, "seed": 0, "exploded_at": ""}, {**run, "seed": 1, "exploded_at": "step 458"}]
    compare.write_tables(tmp_path, rows)
    ablate.write_tables(tmp_path, rows)
    for name in ("compare.md", "results.md"):
        assert "Exploding gradient reported (TrainingHealth): hm seed 1 at step 458." in (tmp_path / name).read_text()


@pytest.mark.slow
def test_compare_side_by_side_runs_each_model_in_its_own_pinned_process(tiny_configs, tmp_path, capsys):
    import os

    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("needs two cores")
    hm, lstm = tiny_configs
    out = tmp_path / "sbs"
    code = main(["compare", "--hm", str(hm), "--baseline", str(lstm), "--seeds", "3", "--max_steps", "4",
                 "--val_every", "2", "--out", str(out), "--side_by_side", str(cores[0]), str(cores[1])])
    assert code == 0
    printed = capsys.readouterr().out
    assert f"hm_lstm seed 3 on core {cores[0]}" in printed and f"ln_lstm seed 3 on core {cores[1]}" in printed
    runs = list(csv.DictReader((out / "runs.csv").open()))
    assert [(r["label"], r["seed"]) for r in runs] == [("hm_lstm", "3"), ("ln_lstm", "3")]
    for r in runs:
        assert 0 < float(r["test/bpc"]) < 10 and r["equal_steps"] == "4" and 0 < float(r["test_bpc_equal_steps"]) < 10
        assert "hmrnn: run" in (out / f"{r['label']}-seed3" / "log.txt").read_text()  # each child's own output
    assert runs[1]["probe_f1/l1_word"] != "" and runs[0]["probe_f1/l1_word"] == ""  # the baseline is probed, as in series
    assert [c["step"] for c in csv.DictReader((out / "curves.csv").open())] == ["2", "4", "2", "4"]


def test_compare_side_by_side_needs_two_cores_of_this_machine(tiny_configs, tmp_path, capsys):
    hm, lstm = tiny_configs
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--hm", str(hm), "--baseline", str(lstm), "--max_steps", "2", "--out", str(tmp_path / "x"),
              "--side_by_side", "0", "0"])
    assert exc.value.code == 2
    assert "--side_by_side needs two different cores" in capsys.readouterr().err


def test_a_run_row_says_where_the_gradient_exploded_and_which_layers_collapsed():
    from types import SimpleNamespace

    from hmrnn_lightning.callbacks import TrainingHealth
    from hmrnn_lightning.commands.runs import collapse_counts

    health = TrainingHealth()
    health.exploded, health.collapsed = 458, {1: 749}
    hm = SimpleNamespace(trainer=SimpleNamespace(callbacks=[health]), model=SimpleNamespace(has_boundaries=True))
    lstm = SimpleNamespace(trainer=SimpleNamespace(callbacks=[health]), model=SimpleNamespace(has_boundaries=False))
    assert collapse_counts(hm) == {"exploded_at": "step 458", "collapsed": 1, "collapsed_at": "l1@749"}
    assert collapse_counts(lstm) == {"exploded_at": "step 458"}
    assert collapse_counts(SimpleNamespace(trainer=SimpleNamespace(callbacks=[]), model=None)) == {}
    health.rollbacks = [(458, 400)]
    assert collapse_counts(lstm) == {"exploded_at": "step 458 (rolled back at step 458 to step 400)"}
