"""A run's folder, from claiming it to resuming into it.

A fit trains into one folder, ``ROOT/lightning_logs/version_N`` (``ROOT`` is
``trainer.default_root_dir``; another logger names its own ``save_dir/name/version``). It holds:

- ``config.yaml``: the fully resolved config (full class paths), enough to rebuild the run;
- ``checkpoints/last.ckpt``: the newest state, always one file (:class:`~hmrnn_lightning.callbacks.LastCheckpoint`),
  and ``checkpoints/epoch=E-step=S.ckpt``: the best validation so far (``ModelCheckpoint``);
- the logger's files and the boundary pictures.

The folder's life:

1. **Claimed** by rank 0 before anything is written: ``os.mkdir`` of ``version_N`` fails when the
   name is taken, so two fits started at once with one root never share a folder (the loser takes
   the next number). The number is handed to the logger, which would otherwise pick the same free
   number in both processes.
2. **Filled** by the run; ``config.yaml`` first (:class:`SaveAndLogConfig`).
3. **Removed** if the run fails before it has written anything but its config.
4. **Resumed** by ``hmrnn fit --resume RUN`` (or ``--resume last``: the newest run under the root):
   the run's own ``config.yaml`` and ``last.ckpt``, the same folder and logger version, so the
   logs and checkpoints go on where they stopped.

``hmrnn validate/test/predict --ckpt_path RUN/checkpoints/X.ckpt`` without ``--config`` read the
config from the checkpoint's run folder.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch.cli import SaveConfigCallback

from hmrnn_lightning.errors import ConfigError

CONFIG_NAME = "config.yaml"
LAST_NAME = "last.ckpt"
LOGS_NAME = "lightning_logs"
#: hyperparameters that are bookkeeping, not settings: not sent to loggers
_NOT_LOGGED = ("_instantiator", "_class_path", "vocab")
_VERSION = re.compile(r"^version_(\d+)$")


# -- where a run's folder is ---------------------------------------------------------------------


def run_folder(trainer) -> Path | None:
    """``save_dir/name/version`` of the first logger (where ModelCheckpoint writes), else the root dir."""
    logger = trainer.loggers[0] if trainer.loggers else None
    if logger is None:
        return Path(trainer.default_root_dir)
    if logger.save_dir is None:
        return None
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    return Path(logger.save_dir) / str(logger.name) / version


def is_run_folder(path: Path) -> bool:
    return (path / CONFIG_NAME).is_file()


def newest_run(root: Path) -> Path | None:
    """The run folder under ``root`` (``root/*`` or ``root/*/*``) whose ``last.ckpt`` was written
    last, or ``None``."""
    candidates = [p.parent.parent for p in [*root.glob(f"*/checkpoints/{LAST_NAME}"), *root.glob(f"*/*/checkpoints/{LAST_NAME}")]]
    candidates = [p for p in candidates if is_run_folder(p)]
    return max(candidates, key=lambda p: (p / "checkpoints" / LAST_NAME).stat().st_mtime, default=None)


def run_of_checkpoint(ckpt: Path) -> Path | None:
    """The run folder a checkpoint file lies in (``RUN/checkpoints/X.ckpt``), if it is one."""
    run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    return run if is_run_folder(run) else None


# -- claiming ---------------------------------------------------------------------------------------


def claim_version(save_dir: str | os.PathLike, name: str) -> int:
    """Create ``save_dir/name/version_N`` for the smallest free ``N`` above those present and return ``N``.

    ``os.mkdir`` is atomic: of two processes asking for one number, one gets ``FileExistsError``
    and tries the next, so each run gets its own folder.
    """
    parent = Path(save_dir) / name
    parent.mkdir(parents=True, exist_ok=True)
    taken = [int(m.group(1)) for p in parent.iterdir() if (m := _VERSION.match(p.name))]
    n = max(taken, default=-1) + 1
    while True:
        try:
            (parent / f"version_{n}").mkdir()
            return n
        except FileExistsError:
            n += 1


def is_rank_zero() -> bool:
    """Rank 0 of the launch (Lightning's DDP launcher starts the other ranks with these set)."""
    return all(os.environ.get(k, "0") == "0" for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def assign_versions(loggers: list, resume_into: Path | None) -> None:
    """Give each folder-keeping logger (TensorBoard, CSV) its version before it picks one itself:
    the resumed run's, or a freshly claimed one on rank 0. A logger whose config names a version
    keeps it. W&B resumes by its run id (``version``), set here from the folder's name."""
    for logger in loggers:
        if hasattr(logger, "_wandb_init"):  # W&B: its folder is named by the run id
            if resume_into is not None:
                logger._id = resume_into.name
                logger._wandb_init.update(id=resume_into.name, resume="allow")
            continue
        if getattr(logger, "_version", 0) is not None:  # not a folder-keeping logger, or its version is given
            continue
        if resume_into is not None:
            m = _VERSION.match(resume_into.name)
            logger._version = int(m.group(1)) if m else resume_into.name
            _keep_csv_metrics(logger, resume_into)
        elif is_rank_zero() and logger.save_dir is not None:
            logger._version = claim_version(logger.save_dir, str(logger.name))


def _keep_csv_metrics(logger, run: Path) -> None:
    """Lightning's CSV logger deletes a folder's ``metrics.csv`` when it starts in it; a resumed run
    keeps the earlier rows under another name instead."""
    metrics = run / "metrics.csv"
    if type(logger).__name__ == "CSVLogger" and metrics.is_file() and metrics.stat().st_size:
        k = 1
        while (run / f"metrics.part{k}.csv").exists():
            k += 1
        metrics.rename(run / f"metrics.part{k}.csv")


# -- what the command line means ------------------------------------------------------------------


def resolve_run_arguments(args: list[str]) -> tuple[list[str], Path | None]:
    """Turn the run-folder shorthands of ``args`` into LightningCLI arguments.

    - ``fit --resume RUN`` (or ``--resume last``): ``--config RUN/config.yaml`` first (later
      ``--config`` files and flags still apply), ``--ckpt_path RUN/checkpoints/last.ckpt``;
      returns ``RUN`` so the loggers write into it again. ``fit --ckpt_path last`` is the same as
      ``--resume last`` with the command's own config.
    - ``validate/test/predict --ckpt_path C`` without a config: the config of ``C``'s run folder;
      a ``C`` that is not a file is refused.
    - a ``--ckpt_path`` given is moved after every ``--config``, so that a config file (a run's
      ``config.yaml`` holds ``ckpt_path: null``) cannot silently undo it.
    - ``validate/test/predict`` without ``--ckpt_path``, or with ``best``/``last`` (which name a
      checkpoint of a fit in the same process, and there is none): refused, since they would
      evaluate untrained weights.

    Raises:
        ConfigError: the run folder or its files are missing, or no checkpoint is named.
    """
    if not args or args[0] not in ("fit", "validate", "test", "predict"):
        return args, None
    command, rest = args[0], list(args[1:])
    if any(a in ("-h", "--help") or a.split("=", 1)[0].endswith(".help") for a in rest):  # --model.help CLASS too
        return args, None
    printing = any(a == "--print_config" or a.startswith("--print_config=") for a in rest)
    resume, rest = _take_option(rest, "--resume")
    root = Path(_option(rest, "--trainer.default_root_dir") or ".")
    if printing:  # shows what would run: --resume's config applies, nothing is refused or claimed
        return (args, None) if resume is None else (_resume_arguments(command, resume_target(resume, root), rest), None)
    ckpt = _option(rest, "--ckpt_path")
    has_config = any(a in ("-c", "--config") or a.startswith(("--config=", "-c=")) for a in rest)
    if command != "fit":
        if resume is not None:
            raise ConfigError(f"{command}: --resume is for fit; give --ckpt_path RUN/checkpoints/{LAST_NAME} instead")
        if ckpt is None or ckpt in ("best", "last"):
            what = "without --ckpt_path" if ckpt is None else f"with --ckpt_path {ckpt} (there is no fit in this command to take it from)"
            raise ConfigError(
                f"{command} {what} would evaluate untrained weights; give a checkpoint file, "
                f"e.g. --ckpt_path RUN/checkpoints/{LAST_NAME}"
            )
        local = not (names_no_file(ckpt) or "://" in ckpt)
        if local and not Path(ckpt).is_file():
            raise ConfigError(f"checkpoint {ckpt}: no such file")
        if not has_config and local:
            run = run_of_checkpoint(Path(ckpt))
            if run is None:
                raise ConfigError(
                    f"{command} --ckpt_path {ckpt}: no {CONFIG_NAME} beside it to say which model and data it needs; "
                    "add --config CONFIG (the config it was trained with)"
                )
            return [command, "--config", str(run / CONFIG_NAME), *rest], None
        return [command, *_replace_option(rest, "--ckpt_path", ckpt)], None
    if resume is None and ckpt == "last":
        run = _newest_run_or_fail(root, "--ckpt_path last")
        rest = _replace_option(rest, "--ckpt_path", str(run / "checkpoints" / LAST_NAME))
        return [command, *rest], run
    if resume is None:
        # last, so that no --config given after it (a run's config.yaml says ckpt_path: null) undoes it
        return (args if ckpt is None else [command, *_replace_option(rest, "--ckpt_path", ckpt)]), None
    if ckpt is not None:
        raise ConfigError("fit: give --resume or --ckpt_path, not both (--resume takes the run's last.ckpt)")
    run = resume_target(resume, root)
    return _resume_arguments(command, run, rest), run


def _resume_arguments(command: str, run: Path, rest: list[str]) -> list[str]:
    """``command`` continuing ``run``: its config first (``rest`` still applies), its ``last.ckpt`` last."""
    return [command, "--config", str(run / CONFIG_NAME), *rest, "--ckpt_path", str(run / "checkpoints" / LAST_NAME)]


def names_no_file(ckpt_path: str) -> bool:
    """Whether a ``--ckpt_path`` value is one of Lightning's names (``best``, ``last``, ``hpc``,
    ``registry``, ``registry:...``) rather than a file."""
    return ckpt_path in ("best", "last", "hpc", "registry") or ckpt_path.startswith("registry:")


def resume_target(resume: str, root: Path) -> Path:
    """The run folder ``--resume`` names: a folder, or ``last`` for the newest run under ``root``."""
    if resume == "last":
        return _newest_run_or_fail(root, "--resume last")
    run = Path(resume)
    if run.is_file():  # a checkpoint or config.yaml inside the run was named
        run = run_of_checkpoint(run) or run.parent
    if not run.is_dir():
        raise ConfigError(f"--resume {resume}: no such run folder")
    if not (run / CONFIG_NAME).is_file():
        raise ConfigError(f"--resume {resume}: not a run folder (no {CONFIG_NAME} in it)")
    if not (run / "checkpoints" / LAST_NAME).is_file():
        raise ConfigError(f"--resume {resume}: the run saved no checkpoints/{LAST_NAME}, so there is nothing to resume")
    return run


def _newest_run_or_fail(root: Path, flag: str) -> Path:
    """The newest run under ``root/lightning_logs`` (the default logger's), else under ``root``."""
    run = newest_run(root / LOGS_NAME) or newest_run(root)
    if run is None:
        raise ConfigError(f"{flag}: no run with checkpoints/{LAST_NAME} under {root.absolute() / LOGS_NAME}")
    return run


def _option(args: list[str], name: str) -> str | None:
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a[len(name) + 1:]
    return None


def _take_option(args: list[str], name: str) -> tuple[str | None, list[str]]:
    """The value of ``name`` (``--name V`` or ``--name=V``) and ``args`` without it."""
    for i, a in enumerate(args):
        if a == name:
            if i + 1 >= len(args):
                raise ConfigError(f"{name} needs a value")
            return args[i + 1], args[:i] + args[i + 2:]
        if a.startswith(name + "="):
            return a[len(name) + 1:], args[:i] + args[i + 1:]
    return None, args


def _replace_option(args: list[str], name: str, value: str) -> list[str]:
    _, rest = _take_option(args, name)
    return [*rest, name, value]


# -- the config in the folder, and removing a failed run's folder ---------------------------------


class SaveAndLogConfig(SaveConfigCallback):
    """Saves the resolved config in the run's own folder and logs the settings once.

    The run's folder is where its checkpoints go (``save_dir/name/version`` of the first logger),
    so two runs never share a ``config.yaml``, W&B included (W&B's ``log_dir`` is its whole
    ``save_dir``). The logger receives the resolved config, without the vocabulary and the
    CLI's bookkeeping keys; the model's own ``save_hyperparameters`` is not sent a second time.
    A run that fails before it has written anything but its config leaves no folder behind.
    """

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.already_saved or (stage != "fit" and not trainer.loggers):
            return  # an evaluation without a logger has no run folder
        run_dir = run_folder(trainer)
        if trainer.is_global_zero and run_dir is not None:
            if stage == "fit":
                from lightning.pytorch.utilities import rank_zero_info

                rank_zero_info(f"Run folder: {run_dir} (config.yaml, checkpoints/, logs)")
            run_dir.mkdir(parents=True, exist_ok=True)
            for stale in run_dir.glob("checkpoints/.*.tmp-*"):  # a save cut off by a kill
                stale.unlink(missing_ok=True)
            tmp = run_dir / f".{self.config_filename}.tmp"
            self.parser.save(self.config, str(tmp), skip_none=False, overwrite=True, multifile=False)
            tmp.replace(run_dir / self.config_filename)
        if trainer.is_global_zero:
            self.save_config(trainer, pl_module, stage)
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)

    def save_config(self, trainer, pl_module, stage: str) -> None:
        if trainer.logger is None:
            return
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False, format="yaml"))
        model = config.get("model")
        if isinstance(model, dict) and isinstance(model.get("init_args"), dict):
            model["init_args"] = {k: v for k, v in model["init_args"].items() if k not in _NOT_LOGGED}
        trainer.logger.log_hyperparams(config)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self.trained = True  # this process has taken a step: its logs are worth keeping

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """Note the failed run's folder; :meth:`remove_if_empty` runs once Lightning has finalized
        the loggers (they write into it after this hook)."""
        self.failed_run = run_folder(trainer) if trainer.is_global_zero else None


def remove_if_empty(run_dir: Path | None, before_training: bool, config_name: str = CONFIG_NAME) -> None:
    """Remove a failed run's folder if it holds nothing but its config and logs with nothing in
    them: an empty ``metrics.csv``, or TensorBoard's event file of a run that failed before its
    first optimizer step (it is written at start, with the hyperparameters only)."""
    if run_dir is None or not run_dir.is_dir():
        return
    kept = {config_name, "hparams.yaml", "metrics.csv"}

    def empty_log(p: Path) -> bool:
        if p.name.startswith("events.out.tfevents."):
            return before_training
        return p.name in kept and (p.name != "metrics.csv" or p.stat().st_size == 0)

    files = [p for p in run_dir.rglob("*") if p.is_file()]
    if all(empty_log(p) for p in files):
        shutil.rmtree(run_dir, ignore_errors=True)
        try:
            run_dir.parent.rmdir()  # the logger's name folder, if this run was its only one
        except OSError:
            pass


def release_claim(loggers: list[Any]) -> None:
    """Remove folders claimed for loggers when the run stopped before using them (still empty)."""
    for logger in loggers:
        version = getattr(logger, "_version", None)
        if isinstance(version, int) and getattr(logger, "save_dir", None):
            folder = Path(logger.save_dir) / str(logger.name) / f"version_{version}"
            try:
                folder.rmdir()
                folder.parent.rmdir()
            except OSError:
                pass


def default_logger(root: str | None):
    """TensorBoard when ``tensorboard`` is installed, else CSV; in ``root/lightning_logs``."""
    import importlib.util

    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    save_dir = root or os.getcwd()
    if importlib.util.find_spec("tensorboard") is not None:
        return TensorBoardLogger(save_dir=save_dir, name=LOGS_NAME)
    return CSVLogger(save_dir=save_dir, name=LOGS_NAME)
