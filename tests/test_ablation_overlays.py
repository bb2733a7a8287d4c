"""The ablation overlays for the choices the paper leaves open: each changes one thing of the
CPU config it names, and the stack it builds runs as the overlay says."""

from pathlib import Path

import pytest
import yaml

from hmrnn_lightning.cli import main

ROOT = Path(__file__).resolve().parents[1]
CPU = ROOT / "configs" / "cpu" / "ptb_hmlstm.yaml"


def overlay(name: str) -> Path:
    """``configs/ablations/<name>``, checked to open with the command that runs it on the CPU config."""
    path = ROOT / "configs" / "ablations" / name
    assert path.read_text().startswith(f"# hmrnn fit --config configs/cpu/ptb_hmlstm.yaml --config {path.relative_to(ROOT)}")
    return path


def cpu_model(capsys, *overlays: str) -> dict:
    """The CPU config's resolved model arguments, with the named overlays of configs/ablations/."""
    args = ["fit", "--config", str(CPU)]
    for name in overlays:
        args += ["--config", str(overlay(name))]
    assert main([*args, "--print_config"]) == 0
    return yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]


def load(*configs):
    """The trainer callbacks after overlaying ``configs`` in order (a list replaces a list)."""
    callbacks = None
    for cfg in configs:
        callbacks = yaml.safe_load(cfg.read_text()).get("trainer", {}).get("callbacks", callbacks)
    return {"callbacks": callbacks}


def test_the_cpu_config_anneals_as_the_paper_and_the_overlay_fast():
    """The base runs the paper's 0.04 per epoch in steps of PTB's epoch; the overlay changes only
    that, to 0.01 per step."""
    base, overlaid = load(CPU)["callbacks"], load(CPU, overlay("slope_fast.yaml"))["callbacks"]
    assert [cb["init_args"] for cb in base if cb["class_path"].endswith(".SlopeAnnealing")] == [
        {"a_max": 5.0, "rate": 0.04, "interval": "step", "steps_per_epoch": 1567}]
    anneal = [cb for cb in overlaid if cb["class_path"].endswith(".SlopeAnnealing")]
    assert anneal == [{"class_path": "hmrnn_lightning.callbacks.SlopeAnnealing",
                       "init_args": {"a_max": 5.0, "rate": 0.01, "interval": "step"}}]
    rest = [cb for cb in base if not cb["class_path"].endswith(".SlopeAnnealing")]
    assert [cb for cb in overlaid if cb not in anneal] == rest  # every other callback, settings included


@pytest.mark.parametrize("name, setting", [("ln_summed.yaml", ("norm_placement", "summed")),
                                           ("flush_without_recurrent.yaml", ("flush_recurrent", False)),
                                           ("no_flush_gradient.yaml", ("flush_gradient", False)),
                                           ("boundary_below_only.yaml", ("boundary_init", "below_only"))])
def test_cell_overlays_set_one_option_of_the_cpu_stack(name, setting, capsys):
    stack = cpu_model(capsys, name)["stack"]["init_args"]
    assert stack[setting[0]] == setting[1] and stack["layer_norm"] is True
    others = {"norm_placement": "bottom_up_and_cell", "flush_recurrent": True, "flush_gradient": True,
              "boundary_init": "uniform"}
    unset = {k: v for k, v in others.items() if k != setting[0]}
    assert {k: v for k, v in stack.items() if k in unset} == unset


def test_the_cpu_config_has_an_entropy_target_and_its_overlays_trade_or_remove_it(capsys):
    model = cpu_model(capsys)
    assert model["boundary_entropy_target"] == [None, 0.18] and model["boundary_entropy_weight"] == 0.3
    assert model["boundary_rate_target"] is None
    old = cpu_model(capsys, "rate_target.yaml")  # the config before the entropy target
    assert old["boundary_rate_target"] == [None, 0.18] and old["boundary_rate_weight"] == 0.1
    assert old["boundary_entropy_target"] is None
    paper = cpu_model(capsys, "no_rate_target.yaml")  # the paper's objective: no target at all
    assert paper["boundary_rate_target"] is None and paper["boundary_entropy_target"] is None
    assert paper["stack"]["init_args"]["hidden_sizes"] == [128, 128, 128]  # the rest is the base's
