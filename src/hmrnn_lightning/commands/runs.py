"""Series of training runs for ``hmrnn compare`` and ``hmrnn ablate``: fit, test on the best
checkpoint, collect metrics, and summarise seeds as mean and spread in one table.

A run is the CLI's own ``fit`` then ``test`` on a config (plus overlays and overrides), so
what a series measures is exactly what ``hmrnn fit`` / ``hmrnn test`` would give.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import lightning.pytorch as pl


@dataclass
class RunSpec:
    """One run of a series.

    Attributes:
        label: what is run (``hm_lstm``, ``ln_lstm``, an overlay's name); rows with the same
            label are seeds of one model and are summarised together.
        configs: config files, later ones overlaying earlier ones.
        seed: ``seed_everything`` for the run.
        args: further CLI arguments (budget, data folder...).
    """

    label: str
    configs: list[str]
    seed: int
    args: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.label}-seed{self.seed}"


class TrainingThroughput(pl.Callback):
    """Training symbols per second: symbols in the training batches over the time spent
    between the start and the end of those batches (forward, backward, optimiser step), so
    validation, checkpointing and start-up do not count. Multiplied by the world size under DDP.
    """

    def __init__(self) -> None:
        self.symbols = 0
        self.seconds = 0.0
        self._start: float | None = None

    def _sync(self, pl_module: pl.LightningModule) -> None:
        if pl_module.device.type == "cuda":  # CUDA runs asynchronously; time the finished work
            import torch

            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._sync(pl_module)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._start is None:
            return
        self._sync(pl_module)
        self.seconds += time.perf_counter() - self._start
        self.symbols += int(batch[0].numel()) * trainer.world_size
        self._start = None

    @property
    def rate(self) -> float:
        return self.symbols / self.seconds if self.seconds > 0 else float("nan")


class ValidationCurve(pl.Callback):
    """Validation BPC against optimizer steps and seconds, one record per validation of a fit
    (the sanity check excluded), and, when ``save_dir`` is given, the weights at each validation
    (``save_dir/step=S.ckpt``, weights only) so that a series can test two models at the same
    step count or the same time.

    Seconds are wall-clock from the start of training (what ``max_time`` counts, validation
    included), less the time spent writing these checkpoints, which a run without them does not spend.

    Args:
        save_dir: folder for the weights at each validation (None: keep none).
    """

    def __init__(self, save_dir: Path | None = None) -> None:
        self.save_dir = save_dir
        #: ``(step, seconds, val_bpc, checkpoint path or "")`` per validation
        self.records: list[tuple[int, float, float, str]] = []
        self._start: float | None = None
        self._saving = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter() if self._start is None else self._start

    def on_validation_end(self, trainer, pl_module) -> None:
        value = trainer.callback_metrics.get("val/bpc")
        if trainer.sanity_checking or self._start is None or value is None:
            return
        seconds = time.perf_counter() - self._start - self._saving
        path = ""
        if self.save_dir is not None:
            began = time.perf_counter()
            path = str(Path(self.save_dir) / f"step={trainer.global_step}.ckpt")
            trainer.save_checkpoint(path, weights_only=True)
            self._saving += time.perf_counter() - began
        self.records.append((trainer.global_step, seconds, float(value), path))


def fail(message: str) -> None:
    """Report bad input to a small command as one line and exit with status 2."""
    print(f"hmrnn: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def split_extra(argv: list[str]) -> tuple[list[str], list[str]]:
    """A command's own arguments, and those after ``--`` that go to every run."""
    if "--" in argv:
        k = argv.index("--")
        return argv[:k], argv[k + 1 :]
    return argv, []


def budget_args(max_time: float | None, max_steps: int | None, val_every: int | None = None) -> list[str]:
    """Trainer arguments for a budget of ``max_time`` minutes and/or ``max_steps`` steps.

    With a budget the config's ``max_epochs`` no longer applies (``-1``), so the budget, not a
    PTB-sized epoch count, ends every run alike (EarlyStopping in the config still may).
    """
    out: list[str] = []
    if max_time is not None:
        if max_time <= 0:
            fail(f"--max_time must be positive minutes, got {max_time}")
        secs = int(round(max_time * 60))
        out.append(f"--trainer.max_time={secs // 86400:02d}:{secs % 86400 // 3600:02d}:{secs % 3600 // 60:02d}:{secs % 60:02d}")
    if max_steps is not None:
        if max_steps <= 0:
            fail(f"--max_steps must be positive, got {max_steps}")
        out.append(f"--trainer.max_steps={max_steps}")
    if out:
        out.append("--trainer.max_epochs=-1")
    if val_every is not None:
        if val_every <= 0:
            fail(f"--val_every must be positive, got {val_every}")
        # steps are counted across epochs, so short budgets still validate (and checkpoint)
        out += [f"--trainer.val_check_interval={val_every}", "--trainer.check_val_every_n_epoch=null"]
    return out


def fit_or_fault(cli) -> str:
    """Fit; a run that :class:`~hmrnn_lightning.callbacks.fault_detection.TrainingFault` stops
    (a non-finite loss or gradient) is a result of the series, not its end: its message is
    returned, and the caller tests the last finite best checkpoint or records NaN."""
    try:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    except Exception as exc:
        if type(exc).__name__ != "TrainingFault":  # the class lives with the callback, imported only if used
            raise
        return " ".join(str(exc).split())
    return ""


def relax_early_stopping(trainer: pl.Trainer) -> None:
    """A budget may end a run before its first validation; EarlyStopping then has nothing to
    check and, being strict, would fail the run at its end. Here it waits for the metric instead."""
    from lightning.pytorch.callbacks import EarlyStopping

    for cb in trainer.callbacks:
        if isinstance(cb, EarlyStopping):
            cb.strict = False


def best_checkpoint(trainer: pl.Trainer) -> tuple[str | None, str]:
    """The best-validation checkpoint of the run and a note.

    ``(ModelCheckpoint.best_model_path, "")`` when the run has one; otherwise ``(None, note)``:
    the test then uses the weights at the end of training, and the note says so.
    """
    for cb in trainer.checkpoint_callbacks:
        path = getattr(cb, "best_model_path", "")
        if getattr(cb, "monitor", None) and path and Path(path).is_file():
            return path, ""
    if not trainer.checkpoint_callbacks:
        return None, "no ModelCheckpoint in the config: tested the last weights"
    return None, "no best checkpoint (no validation finished within the budget): tested the last weights"


@contextlib.contextmanager
def _quiet(logger_name: str):
    """Raise a library logger to WARNING for the duration of the block."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def name_wandb_run(trainer: pl.Trainer, name: str, group: str | None, run_dir: Path | None = None) -> None:
    """Name the W&B run a WandbLogger is about to start, and put it in ``group``, unless the
    config names them. (W&B reads ``WANDB_NAME`` once per process, so the environment cannot
    name the second run of a series; the logger's init arguments can, until it starts.) Its
    files go under ``run_dir``, inside the series' ``--out``, whatever ``save_dir`` the logger
    config names (``configs/logger/wandb.yaml`` says ``runs``): a series keeps all its runs in one place."""
    for logger in trainer.loggers:
        init = getattr(logger, "_wandb_init", None)
        if isinstance(init, dict) and getattr(logger, "_experiment", None) is None:
            if not init.get("name"):
                init["name"] = name
            if group and not init.get("group"):
                init["group"] = group
            if run_dir is not None:
                init["dir"] = logger._save_dir = str(run_dir)


def finish_wandb() -> None:
    """End the current W&B run, so the next run of the series starts its own."""
    wandb = sys.modules.get("wandb")  # never import W&B for runs that do not use it
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


def count_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_cli(configs: Sequence[str], args: Sequence[str], quiet: bool = False, inspect_only: bool = False):
    """The CLI's trainer, model and datamodule for configs plus arguments, without running.
    ``quiet`` keeps Lightning's start-up lines (seed, devices) for builds that only count;
    ``inspect_only`` gives back the run folder the build claimed (nothing will be written there)."""
    from hmrnn_lightning.cli import HMRNNCLI
    from hmrnn_lightning.run_folder import release_claim

    argv: list[str] = []
    for cfg in configs:
        argv += ["--config", str(cfg)]
    if quiet:
        with _quiet("lightning.pytorch"), _quiet("lightning.fabric"):
            cli = HMRNNCLI(args=argv + list(args), run=False)
    else:
        cli = HMRNNCLI(args=argv + list(args), run=False)
    if inspect_only:
        release_claim(cli.trainer.loggers)
    return cli


def run_one(
    spec: RunSpec,
    root: Path,
    index: int,
    total: int,
    after_test: Callable[[Any, str | None], dict[str, float]] | None = None,
    group: str | None = None,
    callbacks: Sequence[pl.Callback] = (),
) -> dict[str, Any]:
    """Fit, test on the best checkpoint (quietly), and return one row of metrics.

    Args:
        spec: the run.
        root: the series' folder; the run writes under ``root/<label>-seed<k>``.
        index: 1-based position in the series, for the progress line.
        total: runs in the series.
        after_test: extra measurements on the tested model, ``f(cli, checkpoint) -> metrics``.
        group: W&B group; each run is its own W&B run named after it.
        callbacks: further callbacks for the fit (e.g. :class:`ValidationCurve`).

    The row holds :func:`collapse_counts`: ``exploded_at``, and for a model with boundaries
    ``collapsed``, the number of layers :class:`~hmrnn_lightning.callbacks.TrainingHealth` found
    collapsed, and ``collapsed_at`` (``l2@600``: layer and step).
    """
    print(f"hmrnn: run {index}/{total}: {spec.label} seed {spec.seed}", flush=True)
    run_dir = root / spec.name
    try:
        # no model summary per run: a series prints its own table (arguments after -- may turn it back on)
        cli = build_cli(spec.configs, [f"--seed_everything={spec.seed}", f"--trainer.default_root_dir={run_dir}",
                                       "--trainer.enable_model_summary=false", *spec.args])
        relax_early_stopping(cli.trainer)
        name_wandb_run(cli.trainer, spec.name, group, run_dir)
        meter = TrainingThroughput()
        cli.trainer.callbacks.extend([meter, *callbacks])
        fault = fit_or_fault(cli)
        ckpt, note = best_checkpoint(cli.trainer)
        best_val = next((cb.best_model_score for cb in cli.trainer.checkpoint_callbacks if getattr(cb, "best_model_score", None) is not None), None)
        if fault and ckpt is None:
            tested, note = [{"test/bpc": float("nan")}], f"{fault}; no finite checkpoint to test"
        else:
            note = f"{fault}; tested the best checkpoint before it" if fault else note
            with _quiet("lightning.pytorch"):  # "Restoring states from ...": the table says which weights
                tested = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt, verbose=False)
        row: dict[str, Any] = {"label": spec.label, "seed": spec.seed, "params": count_parameters(cli.model),
                               "steps": cli.trainer.global_step, "chars_per_s": meter.rate,
                               "best_val_bpc": float(best_val) if best_val is not None else float("nan")}
        row.update({k: float(v) for k, v in (tested[0] if tested else {}).items()})
        row.update(collapse_counts(cli))
        if after_test is not None:
            row.update(after_test(cli, ckpt))
        row["checkpoint"] = ckpt or ""
        row["note"] = note
    finally:
        finish_wandb()
    if note:
        print(f"hmrnn: note: {spec.name}: {note}", flush=True)
    return row


def collapse_counts(cli) -> dict[str, Any]:
    """For a fit that ran :class:`~hmrnn_lightning.callbacks.TrainingHealth`: ``exploded_at``, the
    step an exploding gradient was reported at (empty if none) and any rollbacks, and for a model with boundaries
    ``collapsed`` (how many layers collapsed) and ``collapsed_at``; nothing without it."""
    from hmrnn_lightning.callbacks import TrainingHealth

    health = next((cb for cb in cli.trainer.callbacks if isinstance(cb, TrainingHealth)), None)
    if health is None:
        return {}
    exploded = "" if health.exploded is None else f"step {health.exploded}"
    if health.rollbacks:
        exploded += " (rolled back " + ", ".join(f"at step {at} to step {to}" for at, to in health.rollbacks) + ")"
    out: dict[str, Any] = {"exploded_at": exploded}
    if getattr(cli.model, "has_boundaries", False):
        out.update(collapsed=len(health.collapsed), collapsed_at=" ".join(f"l{k}@{s}" for k, s in sorted(health.collapsed.items())))
    return out


def evaluate_checkpoint(spec: RunSpec, root: Path, ckpt: str) -> dict[str, float]:
    """The test metrics of a checkpoint of ``spec``'s run (its configs and arguments), quietly,
    without a logger (e.g. the weights :class:`ValidationCurve` kept)."""
    with _quiet("lightning.pytorch"), _quiet("lightning.fabric"):
        cli = build_cli(spec.configs, [f"--seed_everything={spec.seed}", f"--trainer.default_root_dir={root / spec.name}",
                                       "--trainer.enable_model_summary=false", *spec.args, "--trainer.logger=false"], quiet=True)
        tested = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt, verbose=False)
    return {k: float(v) for k, v in (tested[0] if tested else {}).items()}


# -- summaries ---------------------------------------------------------------------------------------
def summarise(rows: list[dict[str, Any]], columns: Sequence[str]) -> list[dict[str, Any]]:
    """Per label: ``n`` and, for every column, the mean and the sample standard deviation
    over seeds (``{col}_mean``, ``{col}_sd``; sd is blank with one seed). Non-finite values
    (a run that diverged) make that label's mean NaN rather than being skipped silently."""
    out = []
    for label in dict.fromkeys(r["label"] for r in rows):
        group = [r for r in rows if r["label"] == label]
        row: dict[str, Any] = {"label": label, "n": len(group)}
        for col in columns:
            vals = [float(r[col]) for r in group if r.get(col) not in (None, "")]
            if not vals:
                row[f"{col}_mean"], row[f"{col}_sd"] = "", ""
                continue
            if col in PER_SEED:
                row[f"{col}_per_seed"] = ", ".join(f"{v:g}" for v in vals)
            mean = sum(vals) / len(vals)
            sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else None
            row[f"{col}_mean"], row[f"{col}_sd"] = mean, ("" if sd is None else sd)
        out.append(row)
    return out


#: columns whose value per seed a table shows (``0, 1, 0``) besides the mean
PER_SEED = ("collapsed",)


#: columns that count (steps, seconds, layers): shown without decimals
COUNTS = ("equal_steps", "equal_time_s", "steps_at_equal_time", "collapsed")


def _fmt(x: Any, digits: int = 3) -> str:
    if x in (None, ""):
        return ""
    if isinstance(x, float):
        if math.isnan(x):
            return "nan"
        return f"{x:.0f}" if abs(x) >= 1000 else f"{x:.{digits}f}"
    return str(x)


def markdown_summary(summary: list[dict[str, Any]], columns: Sequence[str], titles: dict[str, str] | None = None,
                     exact: Sequence[str] = ("params", "steps")) -> str:
    """A Markdown table: one row per label, each cell ``mean ± sd`` (columns in ``exact``, counts
    that are the same for every seed, show the mean alone)."""
    titles = titles or {}
    head = ["model", "seeds"] + [titles.get(c, c) for c in columns]
    rows = [[str(row["label"]), str(row["n"])] + [_cell(row, c, exact) for c in columns] for row in summary]
    return _markdown(head, rows)


#: word-F1 columns the short table picks each model's best layer from, and what a cell adds to its layer
WORD_F1 = (("test/boundary_f1/", ""), ("probe_f1/", ", probe"))


def short_markdown_summary(summary: list[dict[str, Any]], columns: Sequence[str], titles: dict[str, str] | None = None,
                           lead: Sequence[str] = (), exact: Sequence[str] = ("params", "steps")) -> str:
    """The headline table (the full one is the CSV): ``lead`` columns, test BPC, training chars/s
    and the word F1 of each model's best layer (its own boundaries', or the probe's for a model
    without them), each ``mean ± sd``; the F1 cell names the layer (``0.612 ± 0.020 (l1)``)."""
    titles = titles or {}
    shown = [c for c in (*lead, "test/bpc", *EQUAL_BUDGET, "chars_per_s") if c in columns]
    f1 = [c for c in columns if c.endswith("_word") and c.startswith(tuple(p for p, _ in WORD_F1))]
    collapsed = "collapsed" in columns
    head = (["model", "seeds"] + [titles.get(c, c) for c in shown] + (["word F1, best layer"] if f1 else [])
            + (["collapsed layers per seed"] if collapsed else []))
    rows = []
    for row in summary:
        cells = [str(row["label"]), str(row["n"])] + [_cell(row, c, exact) for c in shown]
        if f1:
            scored = [c for c in f1 if isinstance(row.get(f"{c}_mean"), float) and not math.isnan(row[f"{c}_mean"])]
            best = max(scored, key=lambda c: row[f"{c}_mean"], default=None)
            cells.append("" if best is None else f"{_cell(row, best, exact)} ({_layer(best)})")
        if collapsed:
            cells.append(str(row.get("collapsed_per_seed", "")))
        rows.append(cells)
    return _markdown(head, rows)


def series_markdown(table: str, rows: list[dict[str, Any]]) -> str:
    """A series' Markdown page (``compare.md``, ``results.md``): its headline ``table``, the runs
    whose gradient exploded (:func:`explosion_note`), and the boundaries per layer
    (:func:`layer_markdown`) for models that have them."""
    layers = layer_markdown(rows)
    per_layer = f"\nBoundaries per layer (test; word ends; mean ± sd over seeds):\n\n{layers}" if layers else ""
    return table + explosion_note(rows) + per_layer


def explosion_note(rows: list[dict[str, Any]]) -> str:
    """A line naming the runs in which :class:`~hmrnn_lightning.callbacks.TrainingHealth`
    reported an exploding gradient (``exploded_at``), for under a series' table; empty if none.
    The means above include those runs: the line says which seeds to look at."""
    hits = [f"{r['label']} seed {r['seed']} at {r['exploded_at']}" for r in rows if r.get("exploded_at")]
    return f"\nExploding gradient reported (TrainingHealth): {'; '.join(hits)}.\n" if hits else ""


#: the equal-budget columns ``hmrnn compare`` adds, shown in the headline table after the test BPC
EQUAL_BUDGET = ("equal_steps", "test_bpc_equal_steps", "equal_time_s", "steps_at_equal_time", "test_bpc_equal_time")


def layer_markdown(rows: list[dict[str, Any]], stage: str = "test") -> str:
    """A Markdown table of the per-layer boundary figures (:data:`LAYER_FIGURES`) of a series'
    runs, one row per model and layer with a detector, each cell ``mean ± sd`` over seeds; the
    best layer of each model (highest mean exact word F1) is marked ``(best)``. Empty when no
    model has boundaries."""
    columns = [f"{stage}/{name.format(k=k)}" for _, name in LAYER_FIGURES for k in range(1, 1 + _max_layer(rows, stage))]
    summary = summarise(rows, [c for c in columns if any(r.get(c) not in (None, "") for r in rows)])
    figures = [(title, name) for title, name in LAYER_FIGURES if any(f"{stage}/{name.format(k=1)}_mean" in row for row in summary)]
    lines = []
    for row in summary:
        layers = detector_layers([k.removesuffix("_mean") for k in row if k.endswith("_mean") and row[k] != ""], stage)
        means = {f"{stage}/boundary_f1/l{k}_word": row.get(f"{stage}/boundary_f1/l{k}_word_mean") for k in layers}
        best = best_layer(means, stage, layers)
        for k in layers:
            mark = " (best)" if k == best else ""
            lines.append([str(row["label"]), f"l{k}{mark}"] + [_cell(row, f"{stage}/{name.format(k=k)}", ()) for _, name in figures])
    if not lines:
        return ""
    return _markdown(["model", "layer"] + [title for title, _ in figures], lines)


def _layer(column: str) -> str:
    """``l2`` for ``test/boundary_f1/l2_word``, ``l2, probe`` for ``probe_f1/l2_word``."""
    tag = column.rsplit("/", 1)[-1].removesuffix("_word")
    return tag + next(note for prefix, note in WORD_F1 if column.startswith(prefix))


def _cell(row: dict[str, Any], column: str, exact: Sequence[str]) -> str:
    """``mean ± sd`` of a summary column (the mean alone for counts in ``exact``, or one seed)."""
    mean, sd = row.get(f"{column}_mean", ""), row.get(f"{column}_sd", "")
    if column in exact and isinstance(mean, float):
        return f"{mean:.0f}"
    digits = 0 if isinstance(mean, float) and (abs(mean) >= 1000 or column in COUNTS) else 3
    spread = f" ± {sd:.{digits}f}" if isinstance(sd, float) else ""
    return _fmt(mean, digits) + spread


def _markdown(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines) + "\n"


def atomic_write(path: Path, text: str) -> None:
    """Write through a temporary file in the same folder and a rename; mode as umask allows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def csv_text(rows: list[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    columns = list(columns) if columns is not None else list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    return buf.getvalue()


def metric_columns(rows: list[dict[str, Any]], prefixes: Sequence[str]) -> list[str]:
    """Columns present in any row named by ``prefixes``, in their order: a name ending in ``/``
    is a prefix (``test/boundary_rate/`` -> one column per layer), any other name is exact
    (``collapsed`` is not ``collapsed_at``, whose ``l2@305`` is no number)."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return list(dict.fromkeys(k for p in prefixes for k in keys if k == p or (p.endswith("/") and k.startswith(p))))


def informative(column: str, rows: list[dict[str, Any]]) -> bool:
    """Whether a summary shows ``column``: boundary columns only for layers with a detector
    (the top layer's z is 0 by construction), boundary F1 only against word ends."""
    tag = column.rsplit("/", 1)[-1]
    if re.search("boundary_(f1|precision|recall)", column):
        return tag.endswith("_word")
    if column.startswith("test/boundary_rate/"):
        layers = [int(k.rsplit("/l", 1)[1]) for r in rows for k in r if k.startswith("test/boundary_rate/l")]
        return int(tag[1:]) < max(layers, default=0)
    return True


# -- boundaries per layer ------------------------------------------------------------------------------
#: the per-layer boundary figures, as (title, metric name with ``{k}`` for the layer); each is logged
#: as ``{stage}/<name>`` by the language model (the word-end ones against the ``word`` level)
LAYER_FIGURES = (
    ("rate", "boundary_rate/l{k}"),
    ("on sep", "boundary_rate_sep/l{k}"),
    ("on other", "boundary_rate_other/l{k}"),
    # the symbols just before and just after each word end: which side a layer fires on
    ("before end", "boundary_rate_before_end/l{k}"),
    ("after end", "boundary_rate_after_end/l{k}"),
    ("P", "boundary_precision/l{k}_word"),
    ("R", "boundary_recall/l{k}_word"),
    ("F1", "boundary_f1/l{k}_word"),
    ("P ±1", "boundary_precision_tol1/l{k}_word"),
    ("R ±1", "boundary_recall_tol1/l{k}_word"),
    ("F1 ±1", "boundary_f1_tol1/l{k}_word"),
    # the synthetic corpus's higher levels (shown only where the data has them)
    ("F1 phrase", "boundary_f1/l{k}_phrase"),
    ("F1 sentence", "boundary_f1/l{k}_sentence"),
)


def detector_layers(keys: Sequence[str], stage: str) -> list[int]:
    """Layers (numbered from 1) with a boundary detector among logged metric names: every layer
    with a boundary rate but the top one, whose ``z`` is fixed. None for a stack without boundaries."""
    found = [int(m.group(1)) for k in keys if (m := re.fullmatch(r"boundary_rate/l(\d+)", k.removeprefix(f"{stage}/")))]
    return list(range(1, max(found))) if found else []


def _max_layer(rows: list[dict[str, Any]], stage: str) -> int:
    found = [int(m.group(1)) for r in rows for k in r if (m := re.fullmatch(rf"{stage}/boundary_rate/l(\d+)", k))]
    return max(found, default=0)


def best_layer(values: dict[str, float], stage: str, layers: Sequence[int]) -> int | None:
    """The layer with the highest exact word-end F1 (None when no layer has one)."""
    scored = [(values[f"{stage}/boundary_f1/l{k}_word"], k) for k in layers
              if isinstance(values.get(f"{stage}/boundary_f1/l{k}_word"), float) and not math.isnan(values[f"{stage}/boundary_f1/l{k}_word"])]
    return max(scored)[1] if scored else None


def layer_table(values: dict[str, float], stage: str, indent: str = "  ") -> str:
    """A plain-text table of the per-layer boundary figures (:data:`LAYER_FIGURES`) of one
    evaluation, one row per layer with a detector, and a last line naming the best layer by exact
    word F1; empty for a stack without boundaries."""
    layers = detector_layers(list(values), stage)
    if not layers:
        return ""
    figures = [(title, name) for title, name in LAYER_FIGURES if any(f"{stage}/{name.format(k=k)}" in values for k in layers)]
    rows = [["layer"] + [title for title, _ in figures]]
    for k in layers:
        rows.append([f"l{k}"] + [_fmt(values.get(f"{stage}/{name.format(k=k)}", ""), 3) for _, name in figures])
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = [indent + "  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    best = best_layer(values, stage, layers)
    if best is not None:
        lines.append(f"{indent}best layer (highest exact word F1): l{best}")
    return "\n".join(lines)
