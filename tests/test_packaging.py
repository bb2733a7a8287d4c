"""Packaging: optional services are extras imported only where used; declared what is imported; license; CI."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=\[; ]", r, maxsplit=1)[0].lower() for r in requirements}


def test_optional_services_are_extras_and_what_is_imported_is_declared():
    project = _pyproject()["project"]
    core, extras = _names(project["dependencies"]), project["optional-dependencies"]
    assert not core & {"wandb", "datasets"}
    assert "wandb" in _names(extras["wandb"]) and "datasets" in _names(extras["hub"])
    assert {"pyyaml", "tensorboard", "tqdm", "numpy", "matplotlib", "lightning", "torch"} <= core
    assert {"pytest", "scipy", "wandb"} <= _names(extras["dev"])


def test_license_file_matches_the_metadata():
    project = _pyproject()["project"]
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert any(c.startswith("Programming Language :: Python :: 3.1") for c in project["classifiers"])


def test_package_imports_without_wandb_or_datasets():
    """Blocked imports fail as they do when the extras are not installed."""
    code = (
        "import sys; sys.modules['wandb'] = None; sys.modules['datasets'] = None\n"
        "import hmrnn_lightning, hmrnn_lightning.data, hmrnn_lightning.models, hmrnn_lightning.callbacks\n"
        "import hmrnn_lightning.cli, hmrnn_lightning.data.hub\n"
        "from hmrnn_lightning.data import SyntheticDataModule\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_ci_runs_the_tests_on_two_python_versions():
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "tests.yml").read_text())
    versions = workflow["jobs"]["pytest"]["strategy"]["matrix"]["python-version"]
    assert len(set(versions)) >= 2
    requires = _pyproject()["project"]["requires-python"]
    assert f">={min(versions, key=lambda v: tuple(map(int, v.split('.'))))}" == requires  # the oldest supported is tested
