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
* **Side by side.** With ``--side_by_side A B`` the two models of a seed train at the same time,
  each in its own process with one thread pinned to its own CPU core (``A`` for the HM-LSTM,
  ``B`` for the baseline), so both see the same machine and their seconds compare; otherwise they
  run one after the other in this process, with the threads torch chooses.
* **Equal steps and equal time.** The HM-LSTM takes fewer steps per second than the LSTM, so a
  common wall-clock budget confounds the two. Every validation of every run is recorded
  (``OUT/curves.csv``: step, seconds, validation BPC; drawn in ``OUT/curves.png``, BPC against
  steps and against seconds) with the weights at that validation. After both models of a seed
  have run, each is tested on the weights of the last step both validated at (``equal_steps``,
  ``test_bpc_equal_steps``) and on those of its last validation within the time the faster-ending
  run took to its last validation (``equal_time_s``, ``steps_at_equal_time``,
  ``test_bpc_equal_time``); the other per-validation weights are then deleted. Seconds are
  wall-clock from the start of training, validation included, as ``--max_time`` counts them.
  Without validations (no ``--val_every`` and no epoch finished) these columns stay blank.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from hmrnn_lightning.commands.runs import (
    RunSpec, ValidationCurve, atomic_write, budget_args, build_cli, count_parameters, csv_text, evaluate_checkpoint, fail,
    informative, markdown_summary, metric_columns, run_one, series_markdown, short_markdown_summary, split_extra, summarise,
)
from hmrnn_lightning.commands.options import DefaultsHelpFormatter, check_output_folder

DEFAULT_HM = "configs/ptb_step_anneal.yaml"
DEFAULT_BASELINE = "configs/ptb_ln_lstm.yaml"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hmrnn compare",
        description="Train an HM-LSTM config and the LayerNorm-LSTM baseline (resized to the same parameter count) on "
        "the same data with the same budget and seeds; test each on its best-validation checkpoint, and on its "
        "weights at the same step count and at the same time as the other model of its seed; probe the "
        "LSTM's hidden states for word boundaries; write OUT/compare.csv, OUT/compare.md (mean and spread over "
        "seeds), OUT/runs.csv (one row per run), OUT/curves.csv and OUT/curves.png (validation BPC against steps "
        "and against seconds). compare.md holds the headline columns (test BPC on the best checkpoint, at equal "
        "steps and at equal time, training chars/s, the best layer's word F1, collapsed layers per seed) and the "
        "boundaries of every layer; compare.csv every column. Arguments after `--` go to every "
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
    p.add_argument("--side_by_side", nargs=2, type=int, default=None, metavar=("CORE_HM", "CORE_BASELINE"),
                   help="train the two models of each seed at the same time, each in its own process with one thread "
                   "pinned to its own CPU core (e.g. 0 1), so that their seconds compare; each run's output goes to "
                   "OUT/<run>/log.txt")
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

    hm_params = count_parameters(build_cli(hm_configs, extra, quiet=True, inspect_only=True).model)
    width_args: list[str] = []
    if not args.no_match:
        width, layers, base_params = matched_width(base_configs, extra, hm_params)
        width_args = [f"--model.init_args.stack.init_args.hidden_sizes=[{', '.join([str(width)] * layers)}]"]
        print(f"hmrnn: parameters: {args.names[0]} {hm_params:,}; {args.names[1]} {base_params:,} "
              f"({layers} x {width}, {100 * (base_params - hm_params) / hm_params:+.1f}%)", flush=True)
    else:
        base_params = count_parameters(build_cli(base_configs, extra, quiet=True, inspect_only=True).model)
        print(f"hmrnn: parameters: {args.names[0]} {hm_params:,}; {args.names[1]} {base_params:,} (width from its config)", flush=True)

    specs = []
    for seed in args.seeds:
        specs.append(RunSpec(args.names[0], hm_configs, seed, budget + extra))
        specs.append(RunSpec(args.names[1], base_configs, seed, budget + extra + width_args))  # the matched width wins
    if args.side_by_side is not None:
        cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
        bad = [c for c in args.side_by_side if c not in cores]
        if bad or args.side_by_side[0] == args.side_by_side[1]:
            fail(f"--side_by_side needs two different cores of this machine's {sorted(cores)}, got {args.side_by_side}")
    rows: list[dict[str, Any]] = []
    curves: list[dict[str, Any]] = []
    for k in range(0, len(specs), 2):
        if args.side_by_side is not None:
            pair = run_pair_side_by_side(specs[k:k + 2], out, k, len(specs), args.side_by_side, args.probe_max_fit)
        else:
            pair = [(spec, *fit_with_curve(spec, out, k + n + 1, len(specs), args.probe_max_fit if n == 1 else None))
                    for n, spec in enumerate(specs[k:k + 2])]
        equal_budget(pair, out)
        for spec, row, curve in pair:
            rows.append(row)
            curves += [{"label": spec.label, "seed": spec.seed, "step": st, "seconds": round(sec, 3), "val_bpc": v}
                       for st, sec, v, _ in curve.records]
        write_tables(out, rows, args.full_table)
        write_curves(out, curves)
    print((out / "compare.md").read_text(), end="")
    print(f"hmrnn: wrote {out / 'compare.csv'}, {out / 'compare.md'} and {out / 'runs.csv'}")
    return 0


def run_pair_side_by_side(pair: list[RunSpec], out: Path, done: int, total: int, cores: list[int],
                          probe_max_fit: int) -> list[tuple[RunSpec, dict[str, Any], ValidationCurve]]:
    """Run the two specs of a seed at the same time, each as ``run_job`` in a child process with one
    thread on its own core; return what the sequential loop would have. A child that fails stops
    the series with the path of its log (the other child is stopped too)."""
    jobs = []
    try:
        for n, (spec, core) in enumerate(zip(pair, cores)):
            run_dir = out / spec.name
            run_dir.mkdir(parents=True, exist_ok=True)
            job = {"label": spec.label, "configs": spec.configs, "seed": spec.seed, "args": spec.args, "out": str(out),
                   "index": done + n + 1, "total": total, "probe_max_fit": probe_max_fit if n == 1 else None}
            atomic_write(run_dir / "job.json", json.dumps(job))
            (run_dir / "result.json").unlink(missing_ok=True)
            env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
            with open(run_dir / "log.txt", "w") as log:  # the child keeps its own copy of the file
                child = subprocess.Popen(
                    [sys.executable, "-c", "import sys; from hmrnn_lightning.commands.compare import run_job; "
                     "sys.exit(run_job(sys.argv[1]))", str(run_dir / "job.json")],
                    stdout=log, stderr=subprocess.STDOUT, env=env,
                    preexec_fn=(lambda c=core: os.sched_setaffinity(0, {c})) if hasattr(os, "sched_setaffinity") else None)
            jobs.append((spec, child, run_dir))
            print(f"hmrnn: run {done + n + 1}/{total}: {spec.label} seed {spec.seed} on core {core} "
                  f"(log: {run_dir / 'log.txt'})", flush=True)
        results = []
        for spec, child, run_dir in jobs:
            code = child.wait()
            if code != 0 or not (run_dir / "result.json").is_file():
                fail(f"{spec.name} failed (exit code {code}); see {run_dir / 'log.txt'}")
            result = json.loads((run_dir / "result.json").read_text())
            curve = ValidationCurve(run_dir / "curve")
            curve.records = [tuple(r) for r in result["records"]]
            results.append((spec, result["row"], curve))
        return results
    finally:
        for _, child, _ in jobs:
            if child.poll() is None:
                child.terminate()
                child.wait()


def run_job(path: str) -> int:
    """One run of a side-by-side pair, in its own process: ``run_one`` on the job file that
    :func:`run_pair_side_by_side` wrote, then ``result.json`` (the row and the validation
    records) beside it."""
    import torch

    torch.set_num_threads(1)
    job = json.loads(Path(path).read_text())
    spec = RunSpec(job["label"], job["configs"], job["seed"], job["args"])
    out = Path(job["out"])
    row, curve = fit_with_curve(spec, out, job["index"], job["total"], job["probe_max_fit"])
    atomic_write(out / spec.name / "result.json", json.dumps({"row": row, "records": curve.records}))
    return 0


def fit_with_curve(spec: RunSpec, out: Path, index: int, total: int,
                   probe_max_fit: int | None) -> tuple[dict[str, Any], ValidationCurve]:
    """``run_one`` with a :class:`ValidationCurve` keeping the weights of every validation under
    ``OUT/<run>/curve``, and with ``probe_max_fit`` (the baseline's runs) the probe of its states;
    in this process or in a side-by-side child alike."""
    curve = ValidationCurve(out / spec.name / "curve")
    probe = None
    if probe_max_fit is not None:
        probe = lambda cli, ckpt: probe_hidden_states(cli, probe_max_fit, spec.seed)  # noqa: E731
    return run_one(spec, out, index, total, after_test=probe, callbacks=[curve]), curve


def equal_budget(pair: list[tuple[RunSpec, dict[str, Any], ValidationCurve]], out: Path) -> None:
    """Test both models of a seed at the same step count and at the same time (see the module
    docstring), adding the ``equal_*`` columns to their rows; then delete the weights not used."""
    records = [curve.records for _, _, curve in pair]
    if all(records):
        common = set.intersection(*({r[0] for r in rec} for rec in records))
        limit = min(rec[-1][1] for rec in records)
        for (spec, row, _), rec in zip(pair, records):
            at_steps = next((r for r in reversed(rec) if r[0] == max(common)), None) if common else None
            at_time = next((r for r in reversed(rec) if r[1] <= limit), None)
            tested: dict[str, float] = {}
            for key, record in (("steps", at_steps), ("time", at_time)):
                if record is None:
                    continue
                if record[3] not in tested:
                    tested[record[3]] = evaluate_checkpoint(spec, out, record[3]).get("test/bpc", float("nan"))
                row[f"test_bpc_equal_{key}"] = tested[record[3]]
                row[f"val_bpc_equal_{key}"] = record[2]
            if at_steps is not None:
                row["equal_steps"] = at_steps[0]
            row["equal_time_s"] = round(limit, 1)
            if at_time is not None:
                row["steps_at_equal_time"] = at_time[0]
            row["equal_checkpoints"] = " ".join(sorted(tested))
    for _, row, curve in pair:  # keep only the weights that were tested
        kept = set(str(row.get("equal_checkpoints", "")).split())
        for *_, path in curve.records:
            if path and path not in kept and os.path.exists(path):
                os.remove(path)


def write_curves(out: Path, curves: list[dict[str, Any]]) -> None:
    """``curves.csv`` (one row per validation of every run) and ``curves.png``: validation BPC
    against steps and against seconds, one line per run, one colour per model."""
    if not curves:
        return
    atomic_write(out / "curves.csv", csv_text(curves, ["label", "seed", "step", "seconds", "val_bpc"]))
    from hmrnn_lightning.viz.files import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    labels = list(dict.fromkeys(c["label"] for c in curves))
    for colour, label in enumerate(labels):
        for n, seed in enumerate(dict.fromkeys(c["seed"] for c in curves if c["label"] == label)):
            points = [c for c in curves if c["label"] == label and c["seed"] == seed]
            for ax, x in zip(axes, ("step", "seconds")):
                ax.plot([p[x] for p in points], [p["val_bpc"] for p in points], color=f"C{colour}", marker=".",
                        alpha=0.8, label=label if n == 0 else None)
    axes[0].set(xlabel="optimizer steps", ylabel="validation BPC", title="at equal steps")
    axes[1].set(xlabel="seconds of training (validation included)", title="at equal time")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    save_figure(fig, out / "curves.png")


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
        sized = [*extra, f"--model.init_args.stack.init_args.hidden_sizes=[{sizes}]"]
        return count_parameters(build_cli(configs, sized, quiet=True, inspect_only=True).model)

    layers = len(build_cli(configs, extra, quiet=True, inspect_only=True).model.stack.hidden_sizes)
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
COLUMNS = ("params", "steps", "test/bpc", "equal_steps", "test_bpc_equal_steps", "val_bpc_equal_steps", "equal_time_s",
           "steps_at_equal_time", "test_bpc_equal_time", "val_bpc_equal_time", "best_val_bpc", "chars_per_s", "collapsed",
           "test/boundary_rate/", "test/boundary_rate_sep/", "test/boundary_rate_other/", "test/boundary_precision/",
           "test/boundary_recall/", "test/boundary_f1/", "test/boundary_precision_tol1/", "test/boundary_recall_tol1/",
           "test/boundary_f1_tol1/", "probe_f1/", "probe_f1_tol1/", "probe_ahead1_f1/")


def write_tables(out: Path, rows: list[dict[str, Any]], full: bool = False) -> None:
    """``runs.csv`` (every run), ``compare.csv`` (mean and spread per model, every column) and
    ``compare.md`` (the headline columns, or every column when ``full``, then the boundaries per layer)."""
    columns = [c for c in metric_columns(rows, COLUMNS) if informative(c, rows)]
    summary = summarise(rows, columns)
    atomic_write(out / "runs.csv", csv_text(rows))
    atomic_write(out / "compare.csv", csv_text(summary, ["label", "n"] + [f"{c}_{s}" for c in columns for s in ("mean", "sd")]))
    titles = {c: _title(c) for c in columns}
    table = markdown_summary(summary, columns, titles) if full else short_markdown_summary(summary, columns, titles, lead=("params",))
    atomic_write(out / "compare.md", series_markdown(table, rows))


#: table titles of the compare columns; prefixes in the order they are tried (longer first)
_TITLES = {"params": "params", "steps": "steps", "test/bpc": "test BPC", "best_val_bpc": "best val BPC",
           "chars_per_s": "train chars/s", "equal_steps": "equal steps", "test_bpc_equal_steps": "test BPC at equal steps",
           "val_bpc_equal_steps": "val BPC at equal steps", "equal_time_s": "equal time (s)",
           "steps_at_equal_time": "steps at equal time", "test_bpc_equal_time": "test BPC at equal time",
           "val_bpc_equal_time": "val BPC at equal time", "collapsed": "collapsed layers"}
_PREFIX_TITLES = (
    ("test/boundary_rate/", "z rate {}"),
    ("test/boundary_rate_sep/", "z rate on separators {}"),
    ("test/boundary_rate_other/", "z rate on other symbols {}"),
    ("test/boundary_precision_tol1/", "z word P {} ±1"),
    ("test/boundary_recall_tol1/", "z word R {} ±1"),
    ("test/boundary_precision/", "z word P {}"),
    ("test/boundary_recall/", "z word R {}"),
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
