"""hmrnn compare: matched sizes, several seeds, best checkpoints, one table with mean and spread, the probe."""

from __future__ import annotations

import csv
import math

import pytest

from hmrnn_lightning.cli import main
from hmrnn_lightning.commands.runs import markdown_summary, summarise


def test_compare_on_tiny_synthetic_data(tiny_configs, tmp_path, capsys):
    hm, lstm = tiny_configs
    out = tmp_path / "cmp"
    code = main(["compare", "--hm", str(hm), "--baseline", str(lstm), "--seeds", "3", "--max_steps", "4",
                 "--val_every", "2", "--out", str(out)])
    assert code == 0
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
    assert base_row["test/boundary_rate/l1"] == ""  # an LSTM has no boundaries to report
    for l in (1, 2, 3):
        assert 0 < float(base_row[f"probe_f1/l{l}_word"]) <= 1 and 0 <= float(base_row[f"probe_ahead1_f1/l{l}_word"]) <= 1

    summary = list(csv.DictReader((out / "compare.csv").open()))
    assert [(s["label"], s["n"]) for s in summary] == [("hm_lstm", "1"), ("ln_lstm", "1")]
    assert float(summary[0]["test/bpc_mean"]) == pytest.approx(float(hm_row["test/bpc"]))
    assert summary[0]["test/bpc_sd"] == ""  # one seed: no spread (mean and sd over seeds: see the summary test)
    md = (out / "compare.md").read_text()
    assert md.startswith("| model | seeds | params | test BPC | train chars/s | word F1, best layer |\n")
    assert "| hm_lstm | 1 |" in md and "probe)" in md.splitlines()[3]  # the LSTM's best layer is its probe's
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
