"""The LightningCLI of hmrnn-lightning: ``hmrnn fit|validate|test|predict``.

Kept apart from :mod:`hmrnn_lightning.cli` (the ``hmrnn`` entry point) so that ``hmrnn --help``,
``hmrnn list`` and the small commands start without importing Lightning. Its neighbours:
:mod:`~hmrnn_lightning.run_folder` (claiming, filling and resuming a run's folder),
:mod:`~hmrnn_lightning.checks` (checks on built objects), :mod:`~hmrnn_lightning.patches`
(changes to jsonargparse and Lightning's warnings).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

# every component package is imported, so that jsonargparse resolves their class names
# (``class_path: HMStack``, ``--model.help HMRNNLanguageModel``) as it does for imported subclasses
import hmrnn_lightning.callbacks  # noqa: F401,E402
import hmrnn_lightning.cells  # noqa: F401,E402
import hmrnn_lightning.data  # noqa: F401,E402
import hmrnn_lightning.estimators  # noqa: F401,E402
import hmrnn_lightning.heads  # noqa: F401,E402
import hmrnn_lightning.models  # noqa: F401,E402
from hmrnn_lightning import registry, run_folder
from hmrnn_lightning.checkpoints import CheckpointError, check_fits, load_checkpoint
from hmrnn_lightning.checks import check_estimators, check_trainer_settings, check_writable_places
from hmrnn_lightning.errors import ConfigError, config_error_line, constructor_error_line, leaves
from hmrnn_lightning.patches import install_short_names, quiet_library_warnings
from hmrnn_lightning.run_folder import SaveAndLogConfig

#: the arguments being parsed, so a bad value's report can name its full key (see ``config_error_line``)
_ARGS: list[list[str]] = []

#: the first lines of ``hmrnn <command> --help``, before LightningCLI's full list of options
HELP = {
    "fit": "Train a model from a config: `hmrnn fit --config configs/quickstart.yaml`. Resume an "
           "interrupted run in its own folder with `hmrnn fit --resume RUN` (or `--resume last`: the newest run).",
    "validate": "Validation metrics of a checkpoint: `hmrnn validate --ckpt_path RUN/checkpoints/last.ckpt` "
                "(the run's config.yaml is used unless --config is given).",
    "test": "Test metrics of a checkpoint: `hmrnn test --ckpt_path RUN/checkpoints/epoch=E-step=S.ckpt` "
            "(the best validation; the run's config.yaml is used unless --config is given).",
    "predict": "LightningCLI's predict loop over a config's data, from a checkpoint (--ckpt_path).",
}
HELP_COMMON = (
    " Show the whole resolved config with `--print_config`; list the component names a config may "
    "use (estimators, stacks, heads, datamodules, plugins) with `hmrnn list`; show a model's or "
    "datamodule's options and docstring with e.g. `--model.help HMRNNLanguageModel` or "
    "`--data.help PTBDataModule`. Every option follows."
)


class HMRNNTrainer(Trainer):
    """Lightning's Trainer (every argument is Lightning's own).

    One change of type: the ``limit_*_batches`` are ``int | float``. Lightning declares them ``float | int`` and the parser takes the first type that accepts a
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

        # a nested parser (a subclass's init_args) raises, so that the outer parser's report,
        # which names the key and the class, is the one shown
        if os.environ.get("HMRNN_DEBUG") or not self.exit_on_error:
            return super().error(message, ex)
        sys.stderr.write(f"hmrnn: error: {config_error_line(message, _ARGS[-1] if _ARGS else None)}\n")
        raise SystemExit(2)


class HMRNNCLI(LightningCLI):
    """LightningCLI for hmrnn-lightning.

    Beyond LightningCLI: the datamodule's ``vocab_size``, ``vocab`` and ``stats`` are linked to
    the model's parameters of those names, for whichever model class the config chooses;
    registered short names (``step``, ``hm``, ``ptb``, plugin names; ``hmrnn list``) are
    accepted wherever a class is expected; a ``--ckpt_path`` is checked (readable, of the
    configured model class, finite, same vocabulary, weights that fit, no model setting that
    contradicts it) before it is used; a component that refuses its arguments is reported as one
    line naming its place in the config; and a fit's folder is claimed, kept and resumed as
    :mod:`hmrnn_lightning.run_folder` describes (``--resume RUN``).
    """

    def __init__(self, *args, **kwargs) -> None:
        install_short_names()
        given = kwargs.get("args")
        given = list(sys.argv[1:] if given is None else given) if not isinstance(given, dict) else None
        #: the run folder a fit resumes into (``--resume``), else None
        self.resume_into: Path | None = None
        if given is not None:
            kwargs["args"], self.resume_into = run_folder.resolve_run_arguments(given)
        self._argv = kwargs.get("args") if isinstance(kwargs.get("args"), list) else []
        quiet_library_warnings(evaluating=bool(self._argv) and self._argv[0] in ("validate", "test", "predict"),
                               resuming=self.resume_into is not None)
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
            self._clean_up_failed_run()
            raise

    def _clean_up_failed_run(self) -> None:
        """After Lightning has finalized the loggers (which write into the run's folder): remove a
        new run's folder that holds nothing worth keeping, and folders claimed but never used."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return
        for cb in trainer.callbacks:
            if isinstance(cb, SaveAndLogConfig) and getattr(cb, "failed_run", None) is not None:
                if self.resume_into is None or cb.failed_run.resolve() != self.resume_into.resolve():
                    run_folder.remove_if_empty(cb.failed_run, before_training=not getattr(cb, "trained", False),
                                               config_name=cb.config_filename)
        if self.resume_into is None:
            run_folder.release_claim(trainer.loggers)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Data-dependent sizes go from the datamodule to the model. jsonargparse skips a link whose
        source the datamodule lacks or whose target the model class does not take, so the links
        hold for every model and datamodule, whichever config, ``-c`` or ``--config`` chose them."""
        parser.link_arguments("data.vocab_size", "model.init_args.vocab_size", apply_on="instantiate")
        parser.link_arguments("data.vocab", "model.init_args.vocab", compute_fn=_symbols, apply_on="instantiate")
        parser.link_arguments("data.stats", "model.init_args.stats", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
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
        self._ckpt = None
        if not path or run_folder.names_no_file(str(path)):
            return
        model_path = self.config[sub].get("model", {}).get("class_path")
        expected = registry.import_path(model_path) if model_path else LightningModule
        self._ckpt = load_checkpoint(path, expected=expected if isinstance(expected, type) else None)

    def _parse_ckpt_path(self) -> None:
        """LightningCLI replaces the model's settings with the checkpoint's; a setting the command
        gives that the checkpoint contradicts was silently dropped. Refused instead, naming it."""
        sub = self.config.get("subcommand")
        before = self._model_settings(sub)
        super()._parse_ckpt_path()
        after = self._model_settings(sub)
        changed = sorted(k for k in before if before[k] != after.get(k))
        if changed:
            k = changed[0]
            more = f" (and {len(changed) - 1} more: {', '.join(changed[1:4])})" if len(changed) > 1 else ""
            raise ConfigError(
                f"{k}: the command gives {before[k]!r}, but checkpoint {self.config[sub].ckpt_path} was trained with "
                f"{after.get(k)!r}{more}; a checkpoint's model settings cannot be changed (drop the setting, or start a new run)"
            )

    def _model_settings(self, sub: str | None) -> dict[str, Any]:
        """The model's settings as flat ``model.init_args.a.b`` keys (links from the data excluded)."""
        if not sub:
            return {}
        model = self.config[sub].get("model")
        model = model.as_dict() if hasattr(model, "as_dict") else (model or {})
        linked = {"vocab", "vocab_size", "stats", "_instantiator", "dict_kwargs"}
        return {k: v for k, v in leaves(model, "model", into_lists=False) if not linked & set(k.split("."))}

    def instantiate_classes(self) -> None:
        """As LightningCLI, with a component's refusal of its arguments made one line, then the
        checks that need the built objects (estimators, checkpoint vocabulary and weights; the
        trainer's settings and folders are checked as it is built, :meth:`instantiate_trainer`)."""
        try:
            super().instantiate_classes()
        except Exception as exc:
            line = constructor_error_line(exc, self.config.get(self.subcommand) if self.subcommand else self.config)
            if line is None:
                raise
            raise ConfigError(line) from exc
        check_estimators(self.model)
        if self._ckpt is not None:
            self._check_ckpt_vocab()
            check_fits(self.config[self.subcommand].ckpt_path, self._ckpt, self.model)
            self._ckpt = None  # the weights are read again by Lightning; not kept twice

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """As LightningCLI, with these choices made explicit (each said in ``hmrnn fit --help``):

        - the logger, when the config names none: TensorBoard if ``tensorboard`` is installed, else
          CSV, both under ``default_root_dir/lightning_logs`` (Lightning's own fallback, chosen
          here instead of announced by a warning on every run); its folder is claimed before it
          is used, or is the resumed run's;
        - ``validate``/``test``/``predict`` write no run folder unless ``--trainer.logger`` is
          given on the command line (their results are printed; a run's ``config.yaml`` names
          the training's logger, which would start a second W&B run), and drop the checkpoint
          callbacks (they save nothing there);
        - a fit keeps ``checkpoints/last.ckpt`` with :class:`~hmrnn_lightning.callbacks.LastCheckpoint`
          (added when the config has none; ``ModelCheckpoint``'s ``save_last`` is turned off, so
          there is one ``last.ckpt``, always the newest) and saves checkpoints atomically
          (:class:`~hmrnn_lightning.checkpoint_io.AtomicCheckpointIO`);
        - callbacks that monitor a validation metric (``ModelCheckpoint``, ``EarlyStopping``) act
          when validation ends, not at a training epoch's end, where a run stopped by
          ``max_steps`` before its first validation has no such metric;
        - without a logger (``--trainer.logger=false``) a config's ``LearningRateMonitor`` is left
          out: Lightning stops the fit with a traceback when it has nowhere to log.
        """
        from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
        from lightning.pytorch.plugins import CheckpointIO

        from hmrnn_lightning.callbacks import LastCheckpoint
        from hmrnn_lightning.checkpoint_io import AtomicCheckpointIO

        trainer_cfg = self._get(self.config_init, "trainer", default={})
        check_trainer_settings(trainer_cfg)
        fitting = self.subcommand in (None, "fit")
        unnamed = trainer_cfg.get("logger") in (None, True)
        if fitting and unnamed:
            kwargs.setdefault("logger", run_folder.default_logger(trainer_cfg.get("default_root_dir")))
        elif not fitting and not any(a.startswith("--trainer.logger") for a in self._argv):
            kwargs.setdefault("logger", False)
        callbacks = trainer_cfg.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        if not fitting:
            callbacks = [cb for cb in callbacks if not isinstance(cb, (ModelCheckpoint, LastCheckpoint))]
        elif trainer_cfg.get("enable_checkpointing", True) is not False:
            for cb in callbacks:
                if isinstance(cb, ModelCheckpoint):
                    cb.save_last = False
            if not any(isinstance(cb, LastCheckpoint) for cb in callbacks):
                callbacks = [*callbacks, LastCheckpoint()]
            plugins = trainer_cfg.get("plugins") or []
            plugins = plugins if isinstance(plugins, list) else [plugins]
            if not any(isinstance(p, CheckpointIO) for p in plugins):
                kwargs.setdefault("plugins", [*plugins, AtomicCheckpointIO()])
        for cb in callbacks:
            monitor = getattr(cb, "monitor", None)
            if not (isinstance(monitor, str) and monitor.startswith("val")):
                continue
            # the constructor arguments save_on_train_epoch_end / check_on_train_epoch_end, left unset
            if isinstance(cb, ModelCheckpoint) and cb._save_on_train_epoch_end is None:
                cb._save_on_train_epoch_end = False
            if isinstance(cb, EarlyStopping) and cb._check_on_train_epoch_end is None:
                cb._check_on_train_epoch_end = False
        logger = kwargs.get("logger", trainer_cfg.get("logger"))
        if logger in (False, []):
            # Lightning refuses to start a LearningRateMonitor without a logger; it has nothing to do then
            callbacks = [cb for cb in callbacks if not isinstance(cb, LearningRateMonitor)]
        kwargs.setdefault("callbacks", callbacks)
        loggers = logger if isinstance(logger, list) else [logger] if logger not in (None, False, True) else []
        check_writable_places(trainer_cfg.get("default_root_dir"), loggers)  # before a folder is claimed
        if fitting:
            run_folder.assign_versions(loggers, self.resume_into)
        return super().instantiate_trainer(**kwargs)

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        """``validate``/``test`` print a short table (:meth:`print_results`) instead of Lightning's
        table of every metric (29 to 52 rows), unless ``--verbose true`` is given."""
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if subcommand in ("validate", "test") and self._short_results():
            kwargs["verbose"] = False
        return kwargs

    def _short_results(self) -> bool:
        return not any(a.startswith("--verbose") for a in self._argv)

    def after_validate(self) -> None:
        self.print_results("val")

    def after_fit(self) -> None:
        """The last validation's figures, per layer, so that a fit ends saying what its
        boundaries found (the quickstart's word, phrase and sentence F1)."""
        if self.trainer.state.status == "finished":
            self.print_results("val")

    def after_test(self) -> None:
        self.print_results("test")

    def print_results(self, stage: str) -> None:
        """The headline metrics of an evaluation: BPC (or log-likelihood) and, for a stack with
        boundaries, one row per layer with a detector: its boundary rate, its rate on separators
        and on other symbols, and precision, recall and F1 against word ends, exact and within one
        step, naming the best layer (highest exact F1); the count of the others, which
        ``--verbose true`` shows (all of them are logged when a logger is given)."""
        from hmrnn_lightning.commands.runs import LAYER_FIGURES, detector_layers, layer_table

        if not self._short_results() or not self.trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith(f"{stage}/")}
        headline = [k for k in (f"{stage}/bpc", f"{stage}/loglik") if k in metrics]
        if not headline:
            return
        layers = detector_layers(list(metrics), stage)
        in_table = {f"{stage}/{name.format(k=k)}" for _, name in LAYER_FIGURES for k in layers} & set(metrics)
        width = max(len(k) for k in headline)
        lines = [f"  {k:<{width}}  {metrics[k]:.4f}" for k in headline]
        table = layer_table(metrics, stage)
        if table:
            lines += ["  boundaries per layer (rate; on separators, on other symbols; word ends: P, R, F1 exact and ±1 step):", table]
        rest = len(metrics) - len(headline) - len(in_table)
        more = f" ({rest} more with --verbose true)" if rest else ""
        print(f"{stage} results{more}:\n" + "\n".join(lines), flush=True)

    def _check_ckpt_vocab(self) -> None:
        """A language-model checkpoint must have been trained on the data's vocabulary."""
        ckpt_vocab = self._ckpt.get("hmrnn_vocab") if self._ckpt else None
        data_vocab = getattr(self.datamodule, "vocab", None)
        symbols = list(getattr(data_vocab, "symbols", []) or [])
        if ckpt_vocab is not None and symbols and list(ckpt_vocab) != symbols:
            sub = self.subcommand
            raise CheckpointError(
                f"checkpoint {self.config[sub].ckpt_path}: trained on a vocabulary of {len(ckpt_vocab)} symbols, "
                f"the data ({type(self.datamodule).__name__}) has {len(symbols)}; give the config the checkpoint was trained with"
            )


def _symbols(vocab) -> list[str]:
    return list(vocab.symbols)


__all__ = ["HMRNNArgumentParser", "HMRNNCLI", "HMRNNTrainer"]
