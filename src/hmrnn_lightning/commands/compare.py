"""``hmrnn compare``: an HM-LSTM against a LayerNorm-LSTM of matching size, same data, budget and seeds.

The table answers two questions people in the field ask first: is the HM-LSTM's BPC at least
as good as a plain LSTM's at the same cost, and do its boundaries find words better than a
linear probe finds them in the LSTM's hidden states.

Choices made here (the issue leaves them open):

* **Size.** The baseline keeps its config's depth and output embedding; its hidden width
  (one width for all layers) is the integer whose parameter count is closest to the
  HM-LSTM's. Parameter count is a quadratic in the width, so three builds determine it and
  a fourth checks the choice.
* **Data.** Both models read the HM config's ``data`` section (written to
  ``OUT/data.yaml`` and given to both as an overlay), so they see the same text and windows.
* **Order.** Seeds are the outer loop (``hm seed 0, lstm seed 0, hm seed 1, ...``), so an
  interrupted series still holds complete pairs.
* **Spread.** Mean and sample standard deviation over seeds.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import yaml

from hmrnn_lightning.commands.runs import (
    RunSpec, atomic_write, budget_args, build_cli, count_parameters, csv_text, fail, informative, markdown_summary, metric_columns,
    run_one, short_markdown_summary, split_extra, summarise,
)
from hmrnn_lightning.commands.options import DefaultsHelpFormatter, check_output_folder

DEFAULT_HM = "configs/ptb_step_anneal.yaml"
DEFAULT_BASELINE = "configs/ptb_ln_lstm.yaml"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hmrnn compare",
        description="Train an HM-LSTM config and the LayerNorm-LSTM baseline (resized to the same parameter count) on "
        "the same data with the same budget and seeds; test each on its best-validation checkpoint; probe the "
        "LSTM's hidden states for word boundaries; write OUT/compare.csv, OUT/compare.md (mean and spread over "
        "seeds) and OUT/runs.csv (one row per run). compare.md holds the headline columns (test BPC, "
        "training chars/s, the best layer's word F1), compare.csv every column. Arguments after `--` go to every "
        "run, e.g. `-- --data.init_args.data_dir=/path/to/ptb`.",
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument("--hm", default=DEFAULT_HM, help="HM-LSTM config")
    p.add_argument("--baseline", default=DEFAULT_BASELINE, help="baseline config")
    p.add_argument("--names", nargs=2, default=["hm_lstm", "ln_lstm"], metavar=("HM", "BASELINE"), help="labels in the table")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds, one run of each model per seed")
    p.add_argument("--max_time", type=float, default=None, help="training budget per run, in minutes")
    p.add_argument("--max_steps", type=int, default=None, help="training budget per run, in optimiser steps")
    p.add_argument("--val_every", type=int, default=None,
                   help="validate (and checkpoint the best) every this many training steps; use it when a budget is "
                   "shorter than an epoch, or there is no best checkpoint to test")
    p.add_argument("--no_match", action="store_true", help="keep the baseline's width from its config")
    p.add_argument("--probe_max_fit", type=int, default=40_000, help="most validation positions the probe fits on")
    p.add_argument("--out", default="runs/compare", help="output folder")
    p.add_argument("--full_table", action="store_true", help="compare.md (and the printout) with every column of compare.csv")
    return p


def cmd_compare(argv: list[str]) -> int:
    """hmrnn compare: HM-LSTM vs a LayerNorm LSTM of matching parameter count."""
    own, extra = split_extra(argv)
    args = parser().parse_args(own)
    for path in (args.hm, args.baseline):
        if not Path(path).is_file():
            fail(f"config not found: {path}")
    budget = budget_args(args.max_time, args.max_steps, args.val_every)
    check_output_folder(args.out)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data_overlay = shared_data_overlay(args.hm, out)
    hm_configs = [args.hm] + data_overlay
    base_configs = [args.baseline] + data_overlay

    hm_params = count_parameters(build_cli(hm_configs, extra, quiet=True).model)
    width_args: list[str] = []
    if not args.no_match:
        width, layers, base_params = matched_width(base_configs, extra, hm_params)
        width_args = [f"--model.init_args.stack.init_args.hidden_sizes=[{', '.join([str(width)] * layers)}]"]
        print(f"hmrnn: parameters: {args.names[0]} {hm_params:,}; {args.names[1]} {base_params:,} "
              f"({layers} x {width}, {100 * (base_params - hm_params) / hm_params:+.1f}%)", flush=True)
    else:
        base_params = count_parameters(build_cli(base_configs, extra, quiet=True).model)
        print(f"hmrnn: parameters: {args.names[0]} {hm_params:,}; {args.names[1]} {base_params:,} (width from its config)", flush=True)

    specs = []
    for seed in args.seeds:
        specs.append(RunSpec(args.names[0], hm_configs, seed, budget + extra))
        specs.append(RunSpec(args.names[1], base_configs, seed, budget + extra + width_args))  # the matched width wins
    rows: list[dict[str, Any]] = []
    for k, spec in enumerate(specs, 1):
        probe = (lambda cli, ckpt: probe_hidden_states(cli, args.probe_max_fit, spec.seed)) if spec.label == args.names[1] else None
        row = run_one(spec, out, k, len(specs), after_test=probe)
        if spec.label == args.names[1]:  # an LSTM's z is 0 by construction: leave its boundary cells blank
            row = {key: v for key, v in row.items() if not key.startswith(("test/boundary", "test/update", "test/copy", "test/flush"))}
        rows.append(row)
        write_tables(out, rows, args.full_table)
    print((out / "compare.md").read_text(), end="")
    print(f"hmrnn: wrote {out / 'compare.csv'}, {out / 'compare.md'} and {out / 'runs.csv'}")
    return 0


def shared_data_overlay(config: str, out: Path) -> list[str]:
    """The ``data`` section of ``config`` as an overlay file for both models (none if it has none)."""
    cfg = yaml.safe_load(Path(config).read_text()) or {}
    if not isinstance(cfg, dict) or "data" not in cfg:
        return []
    path = out / "data.yaml"
    atomic_write(path, f"# the data section of {config}, given to every run of `hmrnn compare`\n"
                       + yaml.safe_dump({"data": cfg["data"]}, sort_keys=False))
    return [str(path)]


def matched_width(configs: list[str], extra: list[str], target: int) -> tuple[int, int, int]:
    """``(width, layers, parameters)`` of the baseline with one width for all its layers whose
    parameter count is closest to ``target`` (see the module docstring)."""
    def params(width: int, layers: int) -> int:
        sizes = ", ".join([str(width)] * layers)
        return count_parameters(build_cli(configs, [*extra, f"--model.init_args.stack.init_args.hidden_sizes=[{sizes}]"], quiet=True).model)

    layers = len(build_cli(configs, extra, quiet=True).model.stack.hidden_sizes)
    xs = [8, 16, 32]
    ys = [params(x, layers) for x in xs]
    # exact quadratic through three points (Lagrange form, as a*w^2 + b*w + c)
    (x0, x1, x2), (y0, y1, y2) = xs, ys
    a = ((y2 - y0) / (x2 - x0) - (y1 - y0) / (x1 - x0)) / (x2 - x1)
    b = (y1 - y0) / (x1 - x0) - a * (x0 + x1)
    c = y0 - a * x0 * x0 - b * x0
    if a > 0:
        root = (-b + math.sqrt(max(b * b - 4 * a * (c - target), 0.0))) / (2 * a)
    else:
        root = (target - c) / b
    candidates = sorted({max(1, math.floor(root)), max(1, math.ceil(root))})
    best = min(candidates, key=lambda w: abs(a * w * w + b * w + c - target))
    return best, layers, params(best, layers)


def probe_hidden_states(cli, max_fit: int, seed: int) -> dict[str, float]:
    """The linear word-boundary probe on the tested model: fitted on the validation windows the
    run validated on, scored on the test windows it was tested on (``limit_*_batches``
    included), so the probe and the HM-LSTM's F1 are scored on the same text."""
    import itertools

    from hmrnn_lightning.metrics.probe import probe_word_boundaries

    dm, trainer = cli.datamodule, cli.trainer
    levels = dm.boundary_levels() if hasattr(dm, "boundary_levels") else ["word"]
    if "word" not in levels:
        return {}

    def first(loader, counts):
        n = counts[0] if counts else None
        return _Sized(itertools.islice(loader, int(n)), int(n)) if n is not None and n != float("inf") else loader

    return probe_word_boundaries(cli.model, first(dm.val_dataloader(), trainer.num_val_batches),
                                 first(dm.test_dataloader(), trainer.num_test_batches),
                                 level=levels.index("word"), max_fit=max_fit, seed=seed)


class _Sized:
    """An iterator with a known length (the probe sizes its sample from it)."""

    def __init__(self, it, n: int) -> None:
        self.it, self.n = it, n

    def __iter__(self):
        return iter(self.it)

    def __len__(self) -> int:
        return self.n


#: table columns, in order: prefixes of the row keys that ``run_one`` and the probe produce
COLUMNS = ("params", "steps", "test/bpc", "best_val_bpc", "chars_per_s", "test/boundary_rate/", "test/boundary_f1/",
           "test/boundary_f1_tol1/", "probe_f1/", "probe_f1_tol1/", "probe_ahead1_f1/")


def write_tables(out: Path, rows: list[dict[str, Any]], full: bool = False) -> None:
    """``runs.csv`` (every run), ``compare.csv`` (mean and spread per model, every column) and
    ``compare.md`` (the headline columns, or every column when ``full``)."""
    columns = [c for c in metric_columns(rows, COLUMNS) if informative(c, rows)]
    summary = summarise(rows, columns)
    atomic_write(out / "runs.csv", csv_text(rows))
    atomic_write(out / "compare.csv", csv_text(summary, ["label", "n"] + [f"{c}_{s}" for c in columns for s in ("mean", "sd")]))
    titles = {c: _title(c) for c in columns}
    table = markdown_summary(summary, columns, titles) if full else short_markdown_summary(summary, columns, titles, lead=("params",))
    atomic_write(out / "compare.md", table)


#: table titles of the compare columns; prefixes in the order they are tried (longer first)
_TITLES = {"params": "params", "steps": "steps", "test/bpc": "test BPC", "best_val_bpc": "best val BPC",
           "chars_per_s": "train chars/s"}
_PREFIX_TITLES = (
    ("test/boundary_rate/", "z rate {}"),
    ("test/boundary_f1_tol1/", "z word F1 {} ±1"),
    ("test/boundary_f1/", "z word F1 {}"),
    ("probe_f1_tol1/", "probe word F1 {} ±1"),
    ("probe_f1/", "probe word F1 {}"),
    ("probe_ahead1_f1/", "probe next-ends-word F1 {}"),
)


def _title(column: str) -> str:
    if column in _TITLES:
        return _TITLES[column]
    tag = column.rsplit("/", 1)[-1].replace("_word", "")
    for prefix, title in _PREFIX_TITLES:
        if column.startswith(prefix):
            return title.format(tag)
    return column
