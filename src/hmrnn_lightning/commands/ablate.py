"""``hmrnn ablate``: a base config alone and with each overlay, over several seeds, in one table.

Each run is fitted, then tested on its best-validation checkpoint (``ModelCheckpoint``'s
``best_model_path``; the last weights, with a note, when a run has none) without printing
Lightning's per-run metric table; one summary (mean and spread over seeds) is printed at the
end. With a W&B logger in the config every run is its own W&B run, named
``<overlay>-seed<k>``, and all runs of the ablation share the W&B group ``--name``. The run
machinery is shared with ``hmrnn compare`` (:mod:`hmrnn_lightning.commands.runs`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from hmrnn_lightning.commands.runs import (
    RunSpec, atomic_write, budget_args, csv_text, fail, informative, markdown_summary, metric_columns, run_one,
    series_markdown, short_markdown_summary, split_extra, summarise,
)
from hmrnn_lightning.commands.options import DefaultsHelpFormatter, check_output_folder

#: columns of the summary, as prefixes of the per-run metrics
COLUMNS = ("best_val_bpc", "test/bpc", "chars_per_s", "collapsed", "test/boundary_rate/", "test/boundary_rate_sep/",
           "test/boundary_rate_other/", "test/boundary_precision/", "test/boundary_recall/", "test/boundary_f1/",
           "test/boundary_precision_tol1/", "test/boundary_recall_tol1/", "test/boundary_f1_tol1/")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hmrnn ablate",
        description="Fit and test the base config alone and with each overlay, once per seed; write OUT/runs.csv "
        "(one row per run), OUT/results.csv and OUT/results.md (mean and spread per overlay: results.md the headline "
        "columns, with collapsed layers per seed, and the boundaries of every layer; results.csv every column). Arguments after `--` go to every run. With a W&B logger each run is its "
        "own W&B run in the group --name.",
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument("--base", required=True, help="base config (e.g. configs/ptb_step_anneal.yaml)")
    p.add_argument("--overlays", nargs="*", default=[], help="overlay configs, one run each per seed")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds")
    p.add_argument("--max_time", type=float, default=None, help="training budget per run, in minutes")
    p.add_argument("--max_steps", type=int, default=None, help="training budget per run, in optimiser steps")
    p.add_argument("--val_every", type=int, default=None, help="validate (and checkpoint the best) every this many steps")
    p.add_argument("--out", default="runs/ablation", help="output folder")
    p.add_argument("--name", default="ablation", help="W&B group of the runs")
    p.add_argument("--no-baseline", action="store_true", help="skip the base config alone")
    p.add_argument("--full_table", action="store_true", help="results.md (and the printout) with every column of results.csv")
    return p


def cmd_ablate(argv: list[str]) -> int:
    """hmrnn ablate: the base config with each overlay, several seeds, one summary table."""
    own, extra = split_extra(argv)
    args = parser().parse_args(own)
    for path in [args.base, *args.overlays]:
        if not Path(path).is_file():
            fail(f"config not found: {path}")
    budget = budget_args(args.max_time, args.max_steps, args.val_every)
    check_output_folder(args.out)
    variants = ([] if args.no_baseline else [("base", None)]) + [(Path(o).stem, o) for o in args.overlays]
    if not variants:
        fail("nothing to run: give --overlays or leave out --no-baseline")
    labels = [label for label, _ in variants]
    if len(set(labels)) != len(labels):
        fail(f"two overlays have the same name: {', '.join(labels)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    specs = [RunSpec(label, [args.base] + ([overlay] if overlay else []), seed, budget + extra)
             for seed in args.seeds for label, overlay in variants]
    overlays = dict(variants)
    rows: list[dict[str, Any]] = []
    for k, spec in enumerate(specs, 1):
        row = run_one(spec, out, k, len(specs), group=args.name)
        row["overlay"] = overlays[spec.label] or ""
        rows.append(row)
        write_tables(out, rows, args.full_table)
    print((out / "results.md").read_text(), end="")
    print(f"hmrnn: wrote {out / 'results.csv'}, {out / 'results.md'} and {out / 'runs.csv'}")
    return 0


def write_tables(out: Path, rows: list[dict[str, Any]], full: bool = False) -> None:
    """``runs.csv`` (every run), ``results.csv`` (mean and spread per overlay, every column) and
    ``results.md`` (the headline columns, or every column when ``full``)."""
    columns = [c for c in metric_columns(rows, COLUMNS) if informative(c, rows)]
    summary = summarise(rows, columns)
    atomic_write(out / "runs.csv", csv_text(rows))
    atomic_write(out / "results.csv", csv_text(summary, ["label", "n"] + [f"{c}_{s}" for c in columns for s in ("mean", "sd")]))
    titles = {"best_val_bpc": "best val BPC", "test/bpc": "test BPC", "chars_per_s": "train chars/s", "collapsed": "collapsed layers"}
    titles = {c: titles.get(c, c.removeprefix("test/")) for c in columns}
    table = markdown_summary(summary, columns, titles) if full else short_markdown_summary(summary, columns, titles)
    atomic_write(out / "results.md", series_markdown(table, rows))
