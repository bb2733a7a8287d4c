"""The ``hmrnn`` command: LightningCLI's ``fit|validate|test|predict`` plus small commands of our own.

This module stays light: Lightning (and torch) are imported only by the command that runs,
so ``hmrnn --help``, ``hmrnn --version`` and ``hmrnn list`` answer at once. The LightningCLI
itself is :class:`hmrnn_lightning.lightning_cli.HMRNNCLI` (also importable from here).
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

from hmrnn_lightning.errors import ConfigError, report

#: the small commands, each imported only when it runs: name -> "module:function"
COMMANDS = {
    "list": "hmrnn_lightning.commands.listing:cmd_list",
    "sample": "hmrnn_lightning.commands.sample:cmd_sample",
    "ablate": "hmrnn_lightning.commands.ablate:cmd_ablate",
    "compare": "hmrnn_lightning.commands.compare:cmd_compare",
    "word-ends": "hmrnn_lightning.commands.word_ends:cmd_word_ends",
    "predict": "hmrnn_lightning.commands.predict:cmd_predict",
    "plot-boundaries": "hmrnn_lightning.commands.plots:cmd_plot_boundaries",
    "sample-strokes": "hmrnn_lightning.commands.plots:cmd_sample_strokes",
    "plot-segments": "hmrnn_lightning.commands.plots:cmd_plot_segments",
}
#: LightningCLI's subcommands
TRAINER_COMMANDS = ("fit", "validate", "test", "predict")
#: one line per command for ``hmrnn --help`` (a command missing here is listed without one)
SUMMARIES = {
    "fit": "train a model from a config (checkpoints and logs in the run's folder)",
    "validate": "validation metrics of a checkpoint (--ckpt_path) on a config's data",
    "test": "test metrics (BPC, boundary rates) of a checkpoint on a config's data",
    "predict": "per-symbol bits and each layer's boundaries for a text file, from a checkpoint",
    "list": "the component names a config may use (estimators, stacks, heads, data, plugins)",
    "sample": "generate text from a language-model checkpoint",
    "plot-boundaries": "draw each layer's boundaries for a text (the paper's Figures 3-4)",
    "sample-strokes": "draw sampled handwriting from a handwriting checkpoint",
    "plot-segments": "draw handwriting segmented by the model's boundaries",
    "ablate": "run a base config with each overlay config and tabulate BPC",
    "compare": "HM-LSTM against an LSTM of the same parameter count, over seeds",
    "word-ends": "without separators: HM-LSTM boundaries vs LSTM surprisal peaks vs a probe (two checkpoints)",
}

USAGE = """usage: hmrnn <command> [options]     (hmrnn <command> --help for a command's options)

Hierarchical Multiscale RNNs (Chung, Ahn & Bengio, ICLR 2017) on PyTorch Lightning.

Start here:
  hmrnn fit --config configs/quickstart.yaml                 train the small model (about 30 s on a CPU)
  hmrnn test --ckpt_path RUN/checkpoints/epoch=E-step=S.ckpt test the best validation checkpoint
  hmrnn sample --ckpt_path RUN/checkpoints/epoch=E-step=S.ckpt --prime "the "
  hmrnn fit --resume RUN                                     go on after an interruption
(RUN is the run folder `hmrnn fit` names when it starts, e.g. lightning_logs/version_0; its
checkpoints/last.ckpt is the newest state, epoch=E-step=S.ckpt the best validation)

commands:
{commands}

options:
  -h, --help     this message
  --version      the installed version
Set HMRNN_DEBUG=1 to see full tracebacks and jsonargparse's complete reports."""


def usage() -> str:
    names = list(TRAINER_COMMANDS) + [n for n in COMMANDS if n not in TRAINER_COMMANDS]
    width = max(len(n) for n in names) + 2
    return USAGE.format(commands="\n".join(f"  {n:<{width}}{SUMMARIES.get(n, '')}".rstrip() for n in names))


def __getattr__(name: str) -> Any:
    """``HMRNNCLI`` and its parts, imported from :mod:`hmrnn_lightning.lightning_cli` on first use."""
    if name in ("HMRNNCLI", "HMRNNArgumentParser", "SaveAndLogConfig"):
        return getattr(importlib.import_module("hmrnn_lightning.lightning_cli"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def require_file(path: str, what: str) -> None:
    """A file the user named must exist (a :class:`~hmrnn_lightning.data.base.DataError` if not)."""
    from pathlib import Path

    if not Path(path).is_file():
        from hmrnn_lightning.data.base import DataError

        raise DataError(f"{what} not found: {path}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hmrnn`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] == "--version":
        from hmrnn_lightning import __version__

        print(f"hmrnn-lightning {__version__}")
        return 0
    local_modules_importable()
    try:
        if argv[0] in COMMANDS:
            return _command(argv[0])(argv[1:])
        if argv[0] not in TRAINER_COMMANDS and not argv[0].startswith("-"):
            raise ConfigError(f"unknown command {argv[0]!r}; commands: {', '.join([*TRAINER_COMMANDS, *COMMANDS])}")
        return _run_lightning_cli(argv)
    except Exception as exc:
        interrupted = _interruption(exc)
        if interrupted is not None:
            print(f"hmrnn: {interrupted}", file=sys.stderr)  # not an error: the run can go on
            return interrupted.exit_code
        if not os.environ.get("HMRNN_DEBUG") and is_training_fault(exc):
            report(exc)  # the run met a NaN or inf: the message names the step and the tensor
            return 1
        if not is_user_error(exc):  # our own lines (a full cache folder, say) stay as they are
            exc = library_error_as_user_error(exc)
        if os.environ.get("HMRNN_DEBUG") or not is_user_error(exc):
            raise
        if isinstance(exc, LookupError) and str(exc).startswith("unknown encoding"):
            # only the datamodules take an encoding; Python's message names the value, not the key
            exc = ConfigError(f"data.init_args.encoding: {exc} (Python codec names: utf-8, latin-1, ascii...)")
        report(exc)
        return 2


def _interruption(exc: BaseException):
    """The :class:`~hmrnn_lightning.callbacks.TrainingInterrupted` behind ``exc``, if a signal stopped the fit."""
    module = sys.modules.get("hmrnn_lightning.callbacks.last_checkpoint")
    return next((e for e in _chain(exc) if module is not None and isinstance(e, module.TrainingInterrupted)), None)


def _chain(exc: BaseException):
    """``exc`` and the exceptions it was raised from or while handling, outermost first."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def library_error_as_user_error(exc: Exception) -> Exception:
    """Errors raised inside Lightning or by the operating system that are the user's to fix,
    as :class:`ConfigError` lines; anything else is returned unchanged.

    - a full disk anywhere in the chain (a checkpoint, a log, the data cache): the file that
      could not be written and where to free space;
    - ``val_check_interval`` longer than an epoch (Lightning's ``ValueError``);
    - a resumed run whose training windows were cut differently (the data's ``ValueError``).
    """
    import errno

    full = next((e for e in _chain(exc) if isinstance(e, OSError) and e.errno == errno.ENOSPC), None)
    if full is not None:
        where = getattr(full, "filename", None)
        place = f" while writing {where}" if where else ""
        return ConfigError(
            f"no space left on the device{place}; free space on that disk, or move the run (--trainer.default_root_dir) "
            "or the data cache (--data.init_args.cache_dir, HMRNN_CACHE_DIR) to another disk"
        )
    text = str(exc).strip()
    if isinstance(exc, ValueError) and text.startswith("`val_check_interval`"):
        return ConfigError(f"trainer.val_check_interval: {text}")
    if isinstance(exc, ValueError) and text.startswith("the checkpoint's training windows were cut differently"):
        return ConfigError(f"--ckpt_path: {text}")
    return exc


def local_modules_importable() -> None:
    """Let class paths name modules in the working folder (``my_est.MyEstimator`` for
    ``./my_est.py``), as ``python -m`` would: the ``hmrnn`` script's own folder is on
    ``sys.path`` instead. Appended, so a local file never shadows an installed package."""
    try:
        cwd = os.getcwd()
    except OSError:  # the working folder was removed: there is nothing local to import
        return
    if "" not in sys.path and cwd not in sys.path:
        sys.path.append(cwd)


def _run_lightning_cli(argv: list[str]) -> int:
    """Run LightningCLI; its parser's exits (``--help``, ``--print_config``, a bad argument)
    become the return code, so ``main`` always returns one."""
    from hmrnn_lightning import registry
    from hmrnn_lightning.lightning_cli import HMRNNCLI

    for failure in registry.load_plugins():  # imported so their classes resolve by name
        print(f"hmrnn: warning: {failure}", file=sys.stderr)
    try:
        HMRNNCLI(args=argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    return 0


def _command(name: str):
    """The small command ``name``, imported only when it runs."""
    module, _, func = COMMANDS[name].partition(":")
    return getattr(importlib.import_module(module), func)


def is_training_fault(exc: BaseException) -> bool:
    """A :class:`~hmrnn_lightning.callbacks.TrainingFault`: not bad input (exit 1, not 2), but
    one line all the same, since the message already says where and what went non-finite."""
    module = sys.modules.get("hmrnn_lightning.callbacks.fault_detection")
    return module is not None and isinstance(exc, module.TrainingFault)


def is_user_error(exc: BaseException) -> bool:
    """Bad input the user can fix (one line, exit 2), as opposed to a bug (a traceback).

    Our own error classes (bad config, data or checkpoint; a training stopped by
    ``FaultDetection``), and an unknown text ``encoding`` (Python's ``LookupError``). Errors
    raised while components are built are turned into :class:`ConfigError` by the CLI when they
    come from a component's own checks, so they arrive here already classified.
    """
    from hmrnn_lightning.checkpoints import CheckpointError
    from hmrnn_lightning.registry import RegistryError

    expected: tuple[type, ...] = (ConfigError, CheckpointError, RegistryError)
    # modules not imported cannot have raised their errors, so they are not imported here
    data = sys.modules.get("hmrnn_lightning.data.base")
    if data is not None:
        expected += (data.DataError,)
    if isinstance(exc, expected):
        return True
    return isinstance(exc, LookupError) and str(exc).startswith("unknown encoding")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
