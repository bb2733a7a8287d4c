"""The LightningCLI of hmrnn-lightning: ``hmrnn fit|validate|test|predict``.

Kept apart from :mod:`hmrnn_lightning.cli` (the ``hmrnn`` entry point) so that ``hmrnn --help``,
``hmrnn list`` and the small commands start without importing Lightning.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

# every component package is imported, so that jsonargparse resolves their class names
# (``class_path: HMStack``, ``--model.help HMRNNLanguageModel``) as it does for imported subclasses
import hmrnn_lightning.callbacks  # noqa: F401,E402
import hmrnn_lightning.cells  # noqa: F401,E402
import hmrnn_lightning.data  # noqa: F401,E402
import hmrnn_lightning.estimators  # noqa: F401,E402
import hmrnn_lightning.heads  # noqa: F401,E402
import hmrnn_lightning.models  # noqa: F401,E402
from hmrnn_lightning import registry
from hmrnn_lightning.checkpoints import CheckpointError, load_checkpoint
from hmrnn_lightning.errors import ConfigError, config_error_line, constructor_error_line

#: the arguments being parsed, so a bad value's report can name its full key (see ``config_error_line``)
_ARGS: list[list[str]] = []

#: hyperparameters that are bookkeeping, not settings: not sent to loggers
_NOT_LOGGED = ("_instantiator", "_class_path", "vocab")

#: the first lines of ``hmrnn <command> --help``, before LightningCLI's full list of options
HELP = {
    "fit": "Train a model from a config: `hmrnn fit --config configs/quickstart.yaml`.",
    "validate": "Validation metrics of a checkpoint: `hmrnn validate --config CONFIG --ckpt_path RUN/checkpoints/last.ckpt`.",
    "test": "Test metrics of a checkpoint: `hmrnn test --config CONFIG --ckpt_path RUN/checkpoints/last.ckpt` "
            "(the config the checkpoint was trained with).",
    "predict": "LightningCLI's predict loop over a config's data.",
}
HELP_COMMON = (
    " Show the whole resolved config with `--print_config`; list the component names a config may "
    "use (estimators, stacks, heads, datamodules, plugins) with `hmrnn list`; show one component's "
    "options and docstring with e.g. `--model.help HMRNNLanguageModel` or "
    "`--model.init_args.stack.help HMStack`. Every option follows."
)


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

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """Note the failed run's folder; :meth:`remove_if_empty` runs once Lightning has finalized
        the loggers (they write into it after this hook)."""
        self.failed_run = run_folder(trainer) if trainer.is_global_zero else None
        self.failed_at_step = trainer.global_step

    def remove_if_empty(self) -> None:
        """Remove the failed run's folder if it holds nothing but its config and logs with nothing
        in them: an empty ``metrics.csv``, or TensorBoard's event file of a run that failed before
        its first optimizer step (it is written at start, with the hyperparameters only)."""
        run_dir = getattr(self, "failed_run", None)
        if run_dir is None or not run_dir.is_dir():
            return
        kept = {self.config_filename, "hparams.yaml", "metrics.csv"}
        before_training = getattr(self, "failed_at_step", 1) == 0

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


def default_logger(root: str | None):
    """TensorBoard when ``tensorboard`` is installed, else CSV; in ``root/lightning_logs``."""
    import importlib.util
    import os

    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    save_dir = root or os.getcwd()
    if importlib.util.find_spec("tensorboard") is not None:
        return TensorBoardLogger(save_dir=save_dir, name="lightning_logs")
    return CSVLogger(save_dir=save_dir, name="lightning_logs")


def run_folder(trainer) -> Path | None:
    """``save_dir/name/version`` of the first logger (where ModelCheckpoint writes), else the root dir."""
    logger = trainer.loggers[0] if trainer.loggers else None
    if logger is None:
        return Path(trainer.default_root_dir)
    if logger.save_dir is None:
        return None
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    return Path(logger.save_dir) / str(logger.name) / version


class HMRNNTrainer(Trainer):
    """Lightning's Trainer, with the ``limit_*_batches`` typed ``int | float``.

    Lightning declares them ``float | int`` and the parser takes the first type that accepts a
    value, so ``--trainer.limit_val_batches 1`` became ``1.0`` (all batches) instead of one batch.
    Here an integer is a count of batches and a float a fraction, as Lightning documents.
    Every other argument is Lightning's own.
    """

    def __init__(
        self,
        *,
        limit_train_batches: int | float | None = None,
        limit_val_batches: int | float | None = None,
        limit_test_batches: int | float | None = None,
        limit_predict_batches: int | float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            limit_train_batches=limit_train_batches,
            limit_val_batches=limit_val_batches,
            limit_test_batches=limit_test_batches,
            limit_predict_batches=limit_predict_batches,
            **kwargs,
        )


class HMRNNArgumentParser(LightningArgumentParser):
    """Reports a bad argument as one ``hmrnn: error: ...`` line naming the key, the value and what is
    allowed, drawn from jsonargparse's nested report (``HMRNN_DEBUG=1`` restores the full report)."""

    def error(self, message: str, ex: Exception | None = None):
        import os
        import sys

        if os.environ.get("HMRNN_DEBUG"):
            return super().error(message, ex)
        sys.stderr.write(f"hmrnn: error: {config_error_line(message, _ARGS[-1] if _ARGS else None)}\n")
        raise SystemExit(2)


class HMRNNCLI(LightningCLI):
    """LightningCLI for hmrnn-lightning.

    Beyond LightningCLI: the datamodule's ``vocab_size``, ``vocab`` and ``stats`` are linked to
    the model's parameters of those names, for whichever model class the config chooses;
    registered short names (``step``, ``hm``, ``ptb``, plugin names; ``hmrnn list``) are
    accepted wherever a class is expected; a ``--ckpt_path`` is checked (readable, of the
    configured model class, finite, same vocabulary) before it is used; and a component that
    refuses its arguments is reported as one line naming its place in the config.
    """

    def __init__(self, *args, **kwargs) -> None:
        install_short_names()
        quiet_library_warnings()
        kwargs.setdefault("save_config_callback", SaveAndLogConfig)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("auto_configure_optimizers", False)
        # each subcommand's --help opens with a short usage line and pointers; the full list stays below
        commands = {c: {"usage": f"hmrnn {c} [-c CONFIG] [--print_config] [--KEY VALUE ...]", "description": h + HELP_COMMON}
                    for c, h in HELP.items()}
        kwargs.setdefault("parser_kwargs", {"parser_mode": "yaml", **commands})
        kwargs.setdefault("parser_class", HMRNNArgumentParser)
        kwargs.setdefault("trainer_class", HMRNNTrainer)
        # a config without seed_everything was seeded with 0 after a warning; 0 is now the stated default
        kwargs.setdefault("seed_everything_default", 0)
        # the settings reach the logger once, as the resolved config (SaveAndLogConfig), not a
        # second time as the model's and datamodule's hyperparameters
        kwargs["trainer_defaults"] = {"enable_autolog_hparams": False, **(kwargs.get("trainer_defaults") or {})}
        try:
            super().__init__(LightningModule, LightningDataModule, *args, **kwargs)
        except BaseException:
            # after Lightning has finalized the loggers, which write into the run's folder
            for cb in getattr(getattr(self, "trainer", None), "callbacks", []):
                if isinstance(cb, SaveAndLogConfig):
                    cb.remove_if_empty()
            raise

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Data-dependent sizes go from the datamodule to the model. jsonargparse skips a link whose
        source the datamodule lacks or whose target the model class does not take, so the links
        hold for every model and datamodule, whichever config, ``-c`` or ``--config`` chose them."""
        parser.link_arguments("data.vocab_size", "model.init_args.vocab_size", apply_on="instantiate")
        parser.link_arguments("data.vocab", "model.init_args.vocab", compute_fn=_symbols, apply_on="instantiate")
        parser.link_arguments("data.stats", "model.init_args.stats", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        import sys

        _ARGS.append(list(sys.argv[1:] if args is None else args) if not isinstance(args, dict) else [])
        try:
            super().parse_arguments(parser, args)
        finally:
            _ARGS.pop()
        self.check_ckpt_path()

    def check_ckpt_path(self) -> None:
        """A given ``--ckpt_path`` must be a sound checkpoint of the configured model class; checked
        before LightningCLI reads the checkpoint's hyperparameters into the config."""
        sub = self.config.get("subcommand")
        path = self.config[sub].get("ckpt_path") if sub else None
        if not path or path in ("best", "last", "hpc", "registry") or str(path).startswith("registry:"):
            return
        model_path = self.config[sub].get("model", {}).get("class_path")
        expected = registry.import_path(model_path) if model_path else LightningModule
        ckpt = load_checkpoint(path, expected=expected if isinstance(expected, type) else None)
        self._ckpt_vocab = ckpt.get("hmrnn_vocab")

    def instantiate_classes(self) -> None:
        """As LightningCLI, with a component's refusal of its arguments made one line, then the
        checks that need the built objects (estimators, checkpoint vocabulary, writable folders)."""
        try:
            super().instantiate_classes()
        except Exception as exc:
            line = constructor_error_line(exc, self.config.get(self.subcommand) if self.subcommand else self.config)
            if line is None:
                raise
            raise ConfigError(line) from exc
        check_estimators(self.model)
        self._check_ckpt_vocab()
        if self.subcommand is not None:
            check_writable(self.trainer)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """As LightningCLI, with three choices made explicit (each said in ``hmrnn fit --help``):

        - the logger, when the config names none: TensorBoard if ``tensorboard`` is installed, else
          CSV, both under ``default_root_dir/lightning_logs`` (Lightning's own fallback, chosen
          here instead of announced by a warning on every run);
        - ``validate``/``test``/``predict`` write no run folder unless the config names a logger
          (their results are printed), and drop ``ModelCheckpoint`` (it saves nothing there and
          restoring its state warns that the folder changed);
        - callbacks that monitor a validation metric (``ModelCheckpoint``, ``EarlyStopping``) act
          when validation ends, not at a training epoch's end, where a run stopped by
          ``max_steps`` before its first validation has no such metric.
        """
        from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

        trainer_cfg = self._get(self.config_init, "trainer", default={})
        unnamed = trainer_cfg.get("logger") in (None, True)
        if self.subcommand in (None, "fit") and unnamed:
            kwargs.setdefault("logger", default_logger(trainer_cfg.get("default_root_dir")))
        elif unnamed:
            kwargs.setdefault("logger", False)
        callbacks = trainer_cfg.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        if self.subcommand in ("validate", "test", "predict"):
            callbacks = [cb for cb in callbacks if not isinstance(cb, ModelCheckpoint)]
        for cb in callbacks:
            monitor = getattr(cb, "monitor", None)
            if not (isinstance(monitor, str) and monitor.startswith("val")):
                continue
            # the constructor arguments save_on_train_epoch_end / check_on_train_epoch_end, left unset
            if isinstance(cb, ModelCheckpoint) and cb._save_on_train_epoch_end is None:
                cb._save_on_train_epoch_end = False
            if isinstance(cb, EarlyStopping) and cb._check_on_train_epoch_end is None:
                cb._check_on_train_epoch_end = False
        kwargs.setdefault("callbacks", callbacks)
        return super().instantiate_trainer(**kwargs)

    def _check_ckpt_vocab(self) -> None:
        """A language-model checkpoint must have been trained on the data's vocabulary."""
        ckpt_vocab = getattr(self, "_ckpt_vocab", None)
        data_vocab = getattr(self.datamodule, "vocab", None)
        symbols = list(getattr(data_vocab, "symbols", []) or [])
        if ckpt_vocab is not None and symbols and list(ckpt_vocab) != symbols:
            sub = self.subcommand
            raise CheckpointError(
                f"checkpoint {self.config[sub].ckpt_path}: trained on a vocabulary of {len(ckpt_vocab)} symbols, "
                f"the data ({type(self.datamodule).__name__}) has {len(symbols)}; give the config the checkpoint was trained with"
            )


def check_estimators(model) -> None:
    """Every boundary estimator in the model implements ``forward`` (a plugin that forgot would
    otherwise pass parsing and fail at the first batch)."""
    from hmrnn_lightning.estimators.base import BoundaryEstimator

    for name, module in model.named_modules():
        if isinstance(module, BoundaryEstimator) and type(module).forward is BoundaryEstimator.forward:
            cls = type(module)
            raise ConfigError(
                f"model.{name} ({cls.__module__}.{cls.__qualname__}): a boundary estimator must implement "
                "forward(logit) -> boundary states; this class does not"
            )


def check_writable(trainer) -> None:
    """The run's folders can be created and written: ``default_root_dir`` and each logger's
    ``save_dir``. Checked by creating a temporary file in the nearest existing folder (permission
    bits alone miss read-only mounts), before anything is written."""
    import tempfile

    places = [("trainer.default_root_dir", trainer.default_root_dir)]
    places += [(f"{type(lg).__name__} save_dir", lg.save_dir) for lg in trainer.loggers if getattr(lg, "save_dir", None)]
    for key, place in places:
        path = Path(place).absolute()
        existing = next(p for p in (path, *path.parents) if p.exists())
        if not existing.is_dir():
            raise ConfigError(f"{key}: cannot create {path}: {existing} is a file, not a folder")
        try:
            with tempfile.TemporaryFile(dir=existing):
                pass
        except OSError as exc:
            raise ConfigError(
                f"{key}: cannot write in {existing} ({exc.strerror or exc}); give a writable folder, "
                "e.g. --trainer.default_root_dir=runs"
            ) from None


def _symbols(vocab) -> list[str]:
    return list(vocab.symbols)


def install_short_names() -> None:
    """Let jsonargparse resolve registered short names wherever it resolves a class name.

    jsonargparse resolves a bare name by matching the class names of imported subclasses of the
    expected type, and has no hook for other aliases; its one resolver is wrapped (once) so a
    registered name (``step``, ``ptb``, a plugin's entry-point name) is tried first. Config files
    (``-c``/``--config``), command-line values and nested ``init_args`` all go through it, and the
    parsed (and saved) config holds the full class path.
    """
    from jsonargparse import _typehints

    original = _typehints.resolve_class_path_by_name
    if getattr(original, "_hmrnn_short_names", False):
        return

    def resolve_class_path_by_name(cls, name: str) -> str:
        if not isinstance(name, str) or "." in name:
            return original(cls, name)
        path = registry.class_path_for(cls, name)
        if path is None:
            path = original(cls, name)
        if "." not in path:
            known = registry.names_for(cls)
            if known:  # one of our kinds: say which names exist
                raise registry.RegistryError(f"unknown name {name!r}; known: {', '.join(known)}; or give a full class path")
        return path

    resolve_class_path_by_name._hmrnn_short_names = True  # type: ignore[attr-defined]
    _typehints.resolve_class_path_by_name = resolve_class_path_by_name


__all__ = ["HMRNNArgumentParser", "HMRNNCLI", "SaveAndLogConfig", "install_short_names", "run_folder"]


def quiet_library_warnings() -> None:
    """Silence library warnings a user of ``hmrnn`` can do nothing about; the only place that does.

    - LightningCLI warns when ``args`` is given while ``sys.argv`` is non-empty: ``hmrnn`` passes its
      own ``sys.argv[1:]`` on purpose (so the small commands and tests share one entry point).
    - Lightning 2.6 calls a torch pytree API that torch 2.13 deprecates (``isinstance(treespec,
      LeafSpec)``); the call is inside Lightning, so only a Lightning release can fix it.

    - Lightning logs a tip to install a logging service on every run whatever logger is chosen
      (an INFO record, not a warning): dropped from Lightning's own log handlers.

    Our own causes are fixed instead: the logger is chosen explicitly (no tensorboardX notice, no
    logging-service tip), and checkpoint/early-stopping monitors wait for validation.
    """
    import warnings

    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
    import logging

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, _DropTips) for f in handler.filters):
                handler.addFilter(_DropTips())


class _DropTips:
    """A logging filter: drops Lightning's advertising tips, keeps everything else."""

    def filter(self, record) -> bool:
        return not str(record.msg).startswith("\U0001f4a1 Tip:")
