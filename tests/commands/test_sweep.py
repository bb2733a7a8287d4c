"""The W&B sweep config: its first line is the command that runs it, and every value it sweeps parses."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hmrnn_lightning.cli import main

ROOT = Path(__file__).resolve().parents[2]
SWEEP = ROOT / "configs" / "sweeps" / "ptb_sweep.yaml"


def test_first_line_is_the_command():
    first = SWEEP.read_text().splitlines()[0]
    assert first.startswith("# wandb sweep ") and "configs/sweeps/ptb_sweep.yaml" in first and "wandb agent" in first


def _agent_args(sweep: dict, choice: dict) -> list[str]:
    """The command line a W&B agent runs for one choice of parameters (``${args}`` as --key=value)."""
    flags = [f"--{key}={value}" for key, value in choice.items()]
    out: list[str] = []
    for part in sweep["command"]:
        out += flags if part == "${args}" else [part]
    return out


@pytest.mark.parametrize("param", yaml.safe_load(SWEEP.read_text())["parameters"])
def test_every_swept_value_parses(param, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # the sweep's paths are relative to the repository, where agents start
    sweep = yaml.safe_load(SWEEP.read_text())
    assert sweep["command"][0] == "hmrnn"
    for value in sweep["parameters"][param]["values"]:
        argv = _agent_args(sweep, {param: value})
        try:
            code = main(argv[1:] + ["--print_config"])
        except SystemExit as exc:  # LightningCLI's own exit, where main does not turn it into a code
            code = exc.code
        assert code in (0, None)
        cfg = yaml.safe_load(capsys.readouterr().out)
        node = cfg
        for key in param.split("."):
            node = node[key]
        got = node["class_path"] if isinstance(node, dict) else node
        assert got == value
