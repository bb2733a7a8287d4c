"""``hmrnn ablate``: a base config once per overlay, results collected in one table."""

from __future__ import annotations

import os
from pathlib import Path

from hmrnn_lightning.cli import HMRNNCLI


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
