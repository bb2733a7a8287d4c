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
    code = main(["compare", "--hm", str(hm), "--baseline", str(lstm), "--seeds", "0", "1", "--max_steps", "4",
                 "--val_every", "2", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "run 1/4: hm_lstm seed 0" in printed and "run 4/4: ln_lstm seed 1" in printed
    counts = [line for line in printed.splitlines() if line.startswith("hmrnn: parameters:")]
    assert counts, printed
    hm_n, base_n = (int(part.split()[1].replace(",", "")) for part in counts[0].split(":", 2)[2].split(";"))
    assert abs(base_n - hm_n) / hm_n < 0.05  # widths chosen to match the HM-LSTM's count

    runs = list(csv.DictReader((out / "runs.csv").open()))
    assert [(r["label"], r["seed"]) for r in runs] == [("hm_lstm", "0"), ("ln_lstm", "0"), ("hm_lstm", "1"), ("ln_lstm", "1")]
    for r in runs:
        assert r["checkpoint"].endswith(".ckpt") and "last" not in r["checkpoint"]  # the best-validation checkpoint
        assert r["note"] == ""
        assert 0 < float(r["test/bpc"]) < 10 and float(r["chars_per_s"]) > 0
        assert int(r["params"]) in (hm_n, base_n)
    hm_row, base_row = runs[0], runs[1]
    assert 0 <= float(hm_row["test/boundary_f1_tol1/l1_word"]) <= 1 and hm_row["probe_f1/l1_word"] == ""
    assert base_row["test/boundary_rate/l1"] == ""  # an LSTM has no boundaries to report
    for l in (1, 2, 3):
        assert 0 < float(base_row[f"probe_f1/l{l}_word"]) <= 1

    summary = list(csv.DictReader((out / "compare.csv").open()))
    assert [s["label"] for s in summary] == ["hm_lstm", "ln_lstm"] and all(s["n"] == "2" for s in summary)
    bpcs = [float(r["test/bpc"]) for r in runs if r["label"] == "hm_lstm"]
    assert float(summary[0]["test/bpc_mean"]) == pytest.approx(sum(bpcs) / 2)
    assert float(summary[0]["test/bpc_sd"]) == pytest.approx(abs(bpcs[0] - bpcs[1]) / math.sqrt(2))
    md = (out / "compare.md").read_text()
    assert md.startswith("| model | seeds | params |") and "| hm_lstm | 2 |" in md and "probe word F1 l1" in md
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
