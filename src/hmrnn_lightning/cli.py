"""hmrnn: train, test and study Hierarchical Multiscale RNNs (LightningCLI, plus small commands).

``hmrnn fit|validate|test|predict`` are LightningCLI subcommands; ``hmrnn list``,
``hmrnn sample`` and ``hmrnn ablate`` are small commands of their own (``hmrnn <cmd> --help``).
"""

from __future__ import annotations

import inspect
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from hmrnn_lightning import registry
from hmrnn_lightning.checkpoints import CheckpointError
from hmrnn_lightning.data.base import DataError

#: config keys whose ``class_path`` may be a registered short name, and the registry kind of each
KEY_KINDS = {"estimator": "estimators", "stack": "stacks", "head": "heads", "data": "datamodules"}


class ConfigError(ValueError):
    """A config that cannot be used, with where and why."""


def expand_short_names(node: Any, key: str | None = None, where: str = "config") -> Any:
    """Replace registered short names (``step``, ``hm``, ``ptb``...) in ``class_path`` by full class paths.

    Saved configs therefore always hold full class paths.
    """
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "class_path" and isinstance(v, str) and "." not in v:
                out[k] = _full_path(v, key, where)
            else:
                out[k] = expand_short_names(v, k if k not in ("init_args", "dict_kwargs") else key, where)
        return out
    if isinstance(node, list):
        return [expand_short_names(v, key, where) for v in node]
    return node


def _full_path(name: str, key: str | None, where: str) -> str:
    """Full class path for a registered short name or class name; unknown names under a
    known key (estimator, stack, head, data) are an error listing what exists."""
    kinds = [KEY_KINDS[key]] if key in KEY_KINDS else list(registry.KINDS)
    for kind in kinds:
        names = registry.available(kind)
        if name in names:
            registry.resolve(kind, name)  # a plugin that fails to import is reported here, by name
            return names[name]
        by_class = {path.rsplit(".", 1)[-1]: path for path in names.values()}
        if name in by_class:
            return by_class[name]
    if key in KEY_KINDS:
        kind = KEY_KINDS[key]
        known = ", ".join(registry.available(kind))
        raise registry.RegistryError(f"{where}: unknown {kind[:-1]} {name!r} for {key!r}; known {kind}: {known}; or give a full class path")
    return name  # jsonargparse may still resolve it


class SaveAndLogConfig(SaveConfigCallback):
    """Saves the resolved config beside the run and sends it to the logger (W&B, CSV...)."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        if trainer.logger is not None:
            flat = self.parser.dump(self.config, skip_none=False, format="yaml")
            trainer.logger.log_hyperparams({"config": yaml.safe_load(flat)})


class HMRNNArgumentParser(LightningArgumentParser):
    """Reports bad arguments as ``hmrnn: error: ...`` without the long usage block
    (``--help`` shows the options; ``HMRNN_DEBUG=1`` restores jsonargparse's full report)."""

    def error(self, message: str, ex: Exception | None = None):
        if os.environ.get("HMRNN_DEBUG"):
            return super().error(message, ex)
        sys.stderr.write(f"hmrnn: error: {message.strip()}\n(--help lists the options)\n")
        raise SystemExit(2)


class HMRNNCLI(LightningCLI):
    """LightningCLI for hmrnn-lightning: links the vocabulary from the datamodule to the model,
    accepts registered short names, and turns bad input into one clear message."""

    def __init__(self, *args, **kwargs) -> None:
        argv = kwargs.get("args")
        self.chosen_model_class = find_model_class(rewrite_argv(list(sys.argv[1:] if argv is None else argv)))
        kwargs.setdefault("save_config_callback", SaveAndLogConfig)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("parser_kwargs", {"parser_mode": "yaml"})
        kwargs.setdefault("parser_class", HMRNNArgumentParser)
        super().__init__(LightningModule, LightningDataModule, *args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        """Data-dependent sizes go from the datamodule to the model: the vocabulary for language
        models, the offset statistics for handwriting models (whichever the model takes)."""
        params = inspect.signature(self.chosen_model_class.__init__).parameters
        if "vocab_size" in params:
            parser.link_arguments("data.vocab_size", "model.init_args.vocab_size", apply_on="instantiate")
        if "vocab" in params:
            parser.link_arguments("data.vocab", "model.init_args.vocab", compute_fn=_symbols, apply_on="instantiate")
        if "stats" in params:
            parser.link_arguments("data.stats", "model.init_args.stats", apply_on="instantiate")

    def parse_arguments(self, parser, args) -> None:
        argv = list(sys.argv[1:] if args is None else args)
        super().parse_arguments(parser, rewrite_argv(argv))


def find_model_class(argv: list[str]) -> type:
    """The model class the arguments choose (the last ``model.class_path`` given), without parsing."""
    from hmrnn_lightning.models import HMRNNLanguageModel

    path = None
    for k, arg in enumerate(argv):
        if arg == "--config" and k + 1 < len(argv):
            try:
                cfg = yaml.safe_load(argv[k + 1])
            except yaml.YAMLError:
                continue
            model = cfg.get("model") if isinstance(cfg, dict) else None
            if isinstance(model, dict) and isinstance(model.get("class_path"), str):
                path = model["class_path"]
        elif arg.startswith(("--model=", "--model.class_path=")):
            value = arg.split("=", 1)[1]
            if not value.startswith("{"):
                path = value
    if path is None:
        return HMRNNLanguageModel
    try:
        cls = registry.import_path(path) if "." in path else None
    except registry.RegistryError:
        cls = None  # jsonargparse reports the bad class path with its own message
    return cls if isinstance(cls, type) else HMRNNLanguageModel


def _symbols(vocab) -> list[str]:
    return list(vocab.symbols)


def rewrite_argv(argv: list[str]) -> list[str]:
    """Inline ``--config`` files with short names expanded, and expand ``--x.class_path=name``."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        value = None
        if arg == "--config" and i + 1 < len(argv):
            value, i = argv[i + 1], i + 1
        elif arg.startswith("--config="):
            value = arg.split("=", 1)[1]
        if value is not None:
            out += ["--config", load_config_text(value)]
        elif arg.startswith("--") and "=" in arg and arg.split("=", 1)[0].endswith(("estimator", "class_path", "stack", "head", "data")):
            flag, val = arg.split("=", 1)
            parts = flag.lstrip("-").split(".")
            key = parts[-2] if parts[-1] == "class_path" and len(parts) > 1 else parts[-1]
            out.append(f"{flag}={_full_path(val, key, flag) if '.' not in val and not val.startswith('{') else val}")
        else:
            out.append(arg)
        i += 1
    return out


def load_config_text(path_or_text: str) -> str:
    path = Path(path_or_text)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from None
        if data is None:
            return "{}"
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a config must be a mapping of sections (trainer, model, data...)")
        return yaml.safe_dump(expand_short_names(data, where=str(path)), sort_keys=False)
    return path_or_text


def require_file(path: str, what: str) -> None:
    if not Path(path).is_file():
        raise DataError(f"{what} not found: {path}")


COMMANDS = {
    "list": "hmrnn_lightning.commands.listing:cmd_list",
    "sample": "hmrnn_lightning.commands.sample:cmd_sample",
    "ablate": "hmrnn_lightning.commands.ablate:cmd_ablate",
    "plot-boundaries": "hmrnn_lightning.commands.plots:cmd_plot_boundaries",
    "sample-strokes": "hmrnn_lightning.commands.plots:cmd_sample_strokes",
    "plot-segments": "hmrnn_lightning.commands.plots:cmd_plot_segments",
}
EXPECTED_ERRORS = (ConfigError, DataError, registry.RegistryError, CheckpointError)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hmrnn`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
    for failure in registry.load_plugins():
        print(f"hmrnn: warning: {failure}", file=sys.stderr)
    try:
        if argv and argv[0] in COMMANDS:
            return _command(argv[0])(argv[1:])
        if argv and argv[0] in ("-h", "--help"):
            print(__doc__.strip().splitlines()[0] + "\n\nextra commands: hmrnn list | sample | plot-boundaries | sample-strokes | plot-segments | ablate  (each takes --help)\n")
        HMRNNCLI(args=argv)
        return 0
    except EXPECTED_ERRORS as exc:
        if os.environ.get("HMRNN_DEBUG"):
            raise
        print(f"hmrnn: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, TypeError) as exc:
        if os.environ.get("HMRNN_DEBUG") or not _from_instantiation(exc):
            raise
        print(f"hmrnn: error: {exc}", file=sys.stderr)
        return 2


def _command(name: str):
    """The small command ``name``, imported only when it runs (so ``hmrnn list`` stays light)."""
    import importlib

    module, _, func = COMMANDS[name].partition(":")
    return getattr(importlib.import_module(module), func)


def _from_instantiation(exc: BaseException) -> bool:
    """True when the error was raised by one of our components' constructors (bad config values)."""
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "__init__" and "hmrnn_lightning" in tb.tb_frame.f_code.co_filename:
            return True
        tb = tb.tb_next
    return False


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
