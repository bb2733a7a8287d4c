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


# -- small commands ------------------------------------------------------------------------------------------


def cmd_list(argv: list[str]) -> int:
    """hmrnn list [KIND]: the registered components, plugins included."""
    if argv and argv[0] in ("-h", "--help"):
        print("usage: hmrnn list [KIND]\n\nLists short names and class paths of components; kinds: " + ", ".join(registry.KINDS))
        return 0
    kinds = argv or list(registry.KINDS)
    for kind in kinds:
        if kind not in registry.KINDS:
            raise registry.RegistryError(f"unknown kind {kind!r}; kinds are {', '.join(registry.KINDS)}")
        plugins = registry.plugin_entry_points(kind)
        print(f"{kind}:")
        for name, path in registry.available(kind).items():
            tag = "  (plugin)" if name in plugins and name not in registry.BUILTIN[kind] else ""
            print(f"  {name:<12} {path}{tag}")
    return 0


def cmd_sample(argv: list[str]) -> int:
    """hmrnn sample: generate text from a checkpoint."""
    import argparse

    import torch

    from hmrnn_lightning.models.language_model import HMRNNLanguageModel

    p = argparse.ArgumentParser(prog="hmrnn sample", description="Generate text from a trained language model checkpoint.")
    p.add_argument("--ckpt_path", required=True, help="checkpoint written by `hmrnn fit`")
    p.add_argument("--prime", default="", help="text the model reads before generating")
    p.add_argument("--length", type=int, default=200, help="symbols to generate")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (> 0; lower is greedier)")
    p.add_argument("--seed", type=int, default=None, help="random seed")
    args = p.parse_args(argv)
    require_file(args.ckpt_path, "checkpoint")
    if args.seed is not None:
        torch.manual_seed(args.seed)
    model = HMRNNLanguageModel.load_from_checkpoint(args.ckpt_path, map_location="cpu")
    print(model.generate(args.prime, args.length, args.temperature))
    return 0


def cmd_plot_boundaries(argv: list[str]) -> int:
    """hmrnn plot-boundaries: the paper's Figures 3-4 for a text, from a checkpoint."""
    import argparse

    from hmrnn_lightning.models.language_model import HMRNNLanguageModel
    from hmrnn_lightning.viz import plot_boundaries

    p = argparse.ArgumentParser(
        prog="hmrnn plot-boundaries",
        description="Draw each layer's boundaries (white/black blocks) and the l2 norm of each layer's h "
        "for a text, as in Figures 3 and 4 of the paper.",
    )
    p.add_argument("--ckpt_path", required=True, help="checkpoint written by `hmrnn fit`")
    p.add_argument("--text", required=True, help="the text to analyse (symbols of the model's vocabulary)")
    p.add_argument("--out", default="boundaries.png", help="PNG file to write")
    args = p.parse_args(argv)
    require_file(args.ckpt_path, "checkpoint")
    model = HMRNNLanguageModel.load_from_checkpoint(args.ckpt_path, map_location="cpu")
    text = args.text.encode().decode("unicode_escape") if "\\" in args.text else args.text
    z, norms = model.analyse(text)
    path = plot_boundaries(text, z.numpy(), norms.numpy(), args.out)
    print(f"wrote {path}")
    return 0


def cmd_sample_strokes(argv: list[str]) -> int:
    """hmrnn sample-strokes: draw sampled handwriting from a checkpoint."""
    import argparse

    from hmrnn_lightning.models.handwriting import HandwritingModel
    from hmrnn_lightning.viz import plot_strokes

    p = argparse.ArgumentParser(prog="hmrnn sample-strokes", description="Sample pen strokes from a handwriting checkpoint and draw them.")
    p.add_argument("--ckpt_path", required=True, help="checkpoint written by `hmrnn fit --config configs/iam_*.yaml`")
    p.add_argument("--length", type=int, default=700, help="points to sample")
    p.add_argument("--bias", type=float, default=0.5, help="sampling bias (0: unbiased; larger: neater)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--out", default="sample.png", help="PNG file to write")
    args = p.parse_args(argv)
    require_file(args.ckpt_path, "checkpoint")
    import torch

    if args.seed is not None:
        torch.manual_seed(args.seed)
    model = HandwritingModel.load_from_checkpoint(args.ckpt_path, map_location="cpu")
    print(f"wrote {plot_strokes(model.generate(args.length, args.bias), args.out)}")
    return 0


def cmd_plot_segments(argv: list[str]) -> int:
    """hmrnn plot-segments: the paper's Figure 5 for one line of the data."""
    import argparse

    from hmrnn_lightning.data.iam import IAMOnDBDataModule
    from hmrnn_lightning.models.handwriting import HandwritingModel
    from hmrnn_lightning.viz import plot_segments

    p = argparse.ArgumentParser(
        prog="hmrnn plot-segments",
        description="Draw one line twice (Figure 5 of the paper): coloured by segments from pen-up, and by "
        "segments from the boundaries of a layer of the model.",
    )
    p.add_argument("--ckpt_path", required=True)
    p.add_argument("--data_dir", default="data/iam-ondb", help="folder with lineStrokes-all.tar.xz and splits/")
    p.add_argument("--split", default="valid", choices=["train", "valid", "test"])
    p.add_argument("--index", type=int, default=0, help="which line of the split")
    p.add_argument("--min_length", type=int, default=300, help="as in training: lines with fewer points are dropped")
    p.add_argument("--layer", type=int, default=2, help="layer whose boundaries colour the second drawing")
    p.add_argument("--out", default="segments.png")
    args = p.parse_args(argv)
    require_file(args.ckpt_path, "checkpoint")
    model = HandwritingModel.load_from_checkpoint(args.ckpt_path, map_location="cpu")
    dm = IAMOnDBDataModule(args.data_dir, min_length=args.min_length)
    ds = dm.dataset(args.split)
    if not 0 <= args.index < len(ds):
        raise DataError(f"--index {args.index} is outside the {len(ds)} lines of the {args.split} split")
    inputs, _ = ds[args.index]
    z = model.boundaries_of(inputs).numpy()
    print(f"wrote {plot_segments(model.to_real_units(inputs), z, args.out, args.layer)}")
    return 0


def cmd_ablate(argv: list[str]) -> int:
    """hmrnn ablate: run a base config with each overlay, collect BPC into CSV and Markdown."""
    import argparse

    p = argparse.ArgumentParser(
        prog="hmrnn ablate",
        description="Fit and test the base config once per overlay (and once alone), then write "
        "OUT/results.csv and OUT/results.md with validation and test BPC. Extra arguments after "
        "`--` go to every run. With W&B on, runs share the group WANDB_RUN_GROUP=<name>.",
    )
    p.add_argument("--base", required=True, help="base config (e.g. configs/ptb_step_anneal.yaml)")
    p.add_argument("--overlays", nargs="*", default=[], help="overlay configs, one run each")
    p.add_argument("--out", default="runs/ablation", help="output folder")
    p.add_argument("--name", default="ablation", help="group name for loggers")
    p.add_argument("--no-baseline", action="store_true", help="skip the run of the base config alone")
    own, _, extra = _split_dashdash(argv)
    args = p.parse_args(own)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("WANDB_RUN_GROUP", args.name)
    runs = ([] if args.no_baseline else [("base", None)]) + [(Path(o).stem, o) for o in args.overlays]
    rows = []
    for name, overlay in runs:
        cfg = ["--config", args.base] + (["--config", overlay] if overlay else [])
        run_dir = out / name
        common = cfg + [f"--trainer.default_root_dir={run_dir}"] + extra
        cli = HMRNNCLI(args=common, run=False)  # run=False: no subcommand; fit and test are called below
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        val = cli.trainer.callback_metrics.get("val/bpc")
        cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=None)
        test = cli.trainer.callback_metrics.get("test/bpc")
        rows.append({"run": name, "overlay": overlay or "", "val_bpc": _num(val), "test_bpc": _num(test)})
        _write_tables(out, rows)
    print((out / "results.md").read_text())
    return 0


def _num(x) -> str:
    return "" if x is None else f"{float(x):.4f}"


def _write_tables(out: Path, rows: list[dict]) -> None:
    import csv

    tmp = out / "results.csv.tmp"
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    tmp.replace(out / "results.csv")
    lines = ["| run | overlay | val BPC | test BPC |", "|---|---|---|---|"]
    lines += [f"| {r['run']} | {r['overlay']} | {r['val_bpc']} | {r['test_bpc']} |" for r in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def _split_dashdash(argv: list[str]) -> tuple[list[str], str, list[str]]:
    if "--" in argv:
        k = argv.index("--")
        return argv[:k], "--", argv[k + 1 :]
    return argv, "", []


COMMANDS = {
    "list": cmd_list, "sample": cmd_sample, "ablate": cmd_ablate, "plot-boundaries": cmd_plot_boundaries,
    "sample-strokes": cmd_sample_strokes, "plot-segments": cmd_plot_segments,
}
EXPECTED_ERRORS = (ConfigError, DataError, registry.RegistryError)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hmrnn`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
    for failure in registry.load_plugins():
        print(f"hmrnn: warning: {failure}", file=sys.stderr)
    try:
        if argv and argv[0] in COMMANDS:
            return COMMANDS[argv[0]](argv[1:])
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
