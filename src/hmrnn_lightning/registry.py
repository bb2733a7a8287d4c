"""Short names for components, and plugins found through entry points.

A name is a convenience; the full class path is the truth, and saved configs always hold
full class paths. An installed package adds components by declaring an entry point in
the group ``hmrnn_lightning.<kind>``, for example in its ``pyproject.toml``::

    [project.entry-points."hmrnn_lightning.estimators"]
    gumbel = "hmrnn_gumbel:GumbelSigmoidEstimator"

Kinds: ``estimators``, ``cells``, ``stacks``, ``heads``, ``datamodules``.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any

BUILTIN: dict[str, dict[str, str]] = {
    "estimators": {
        "step": "hmrnn_lightning.estimators.StepEstimator",
        "bernoulli": "hmrnn_lightning.estimators.BernoulliEstimator",
        "soft": "hmrnn_lightning.estimators.SoftEstimator",
        "reinforce": "hmrnn_lightning.estimators.ReinforceEstimator",
    },
    "cells": {
        "hm_lstm": "hmrnn_lightning.cells.HMLSTMCell",
        "hm_rnn": "hmrnn_lightning.cells.HMRNNCell",
    },
    "stacks": {
        "hm": "hmrnn_lightning.cells.HMStack",
        "lstm": "hmrnn_lightning.cells.LSTMStack",
    },
    "heads": {
        "softmax": "hmrnn_lightning.heads.SoftmaxHead",
        "mdn": "hmrnn_lightning.heads.MixtureDensityHead",
    },
    "datamodules": {
        "ptb": "hmrnn_lightning.data.PTBDataModule",
        "text8": "hmrnn_lightning.data.Text8DataModule",
        "enwik8": "hmrnn_lightning.data.Enwik8DataModule",
        "text": "hmrnn_lightning.data.TextDataModule",
        "synthetic": "hmrnn_lightning.data.SyntheticDataModule",
        "iam": "hmrnn_lightning.data.IAMOnDBDataModule",
    },
}

KINDS = tuple(BUILTIN)


class RegistryError(LookupError):
    """An unknown name, or a plugin that cannot be imported."""


def _check_kind(kind: str) -> None:
    if kind not in BUILTIN:
        raise RegistryError(f"unknown component kind {kind!r}; kinds are {', '.join(KINDS)}")


def plugin_entry_points(kind: str) -> dict[str, Any]:
    """Entry points installed for ``kind``, by name."""
    _check_kind(kind)
    return {ep.name: ep for ep in entry_points(group=f"hmrnn_lightning.{kind}")}


def available(kind: str) -> dict[str, str]:
    """Every name usable for ``kind`` mapped to its class path (plugins included)."""
    _check_kind(kind)
    names = dict(BUILTIN[kind])
    for name, ep in plugin_entry_points(kind).items():
        names.setdefault(name, ep.value.replace(":", "."))
    return dict(sorted(names.items()))


def import_path(path: str) -> Any:
    """Import ``package.module.Name`` (or ``package.module:Name``)."""
    module_name, _, attr = path.replace(":", ".").rpartition(".")
    if not module_name:
        raise RegistryError(f"{path!r} is not a dotted class path")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # a plugin can fail with anything at import time
        raise RegistryError(f"cannot import {module_name!r} (for {path!r}): {type(exc).__name__}: {exc}") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise RegistryError(f"module {module_name!r} has no attribute {attr!r}") from None


def resolve(kind: str, name: str) -> Any:
    """The class registered as ``name`` for ``kind``, or importable as a dotted path."""
    _check_kind(kind)
    if name in BUILTIN[kind]:
        return import_path(BUILTIN[kind][name])
    plugins = plugin_entry_points(kind)
    if name in plugins:
        try:
            return plugins[name].load()
        except Exception as exc:
            raise RegistryError(
                f"the {kind} plugin {name!r} ({plugins[name].value}) failed to import: {type(exc).__name__}: {exc}"
            ) from exc
    if "." in name or ":" in name:
        return import_path(name)
    known = ", ".join(available(kind)) or "(none)"
    raise RegistryError(f"unknown {kind[:-1]} {name!r}; known {kind}: {known}; or give a full class path")


def class_path(kind: str, name: str) -> str:
    """Full class path for a registered name (a dotted path is returned unchanged)."""
    if name in BUILTIN.get(kind, {}):
        return BUILTIN[kind][name]
    plugins = plugin_entry_points(kind)
    if name in plugins:
        return plugins[name].value.replace(":", ".")
    if "." in name:
        return name
    resolve(kind, name)  # raises with the list of known names
    raise AssertionError("unreachable")


def class_path_for(base: type | tuple, name: str) -> str | None:
    """The class path registered as ``name`` whose class is a subclass of ``base`` (a class or a
    tuple of classes), or ``None``. Used by the CLI to resolve short names while parsing, where
    the expected type (``BoundaryEstimator``, ``LightningDataModule``...) says which kind is meant.

    Raises:
        RegistryError: the name is a plugin that fails to import.
    """
    bases = tuple(b for b in (base if isinstance(base, tuple) else (base,)) if isinstance(b, type))
    for kind in KINDS:
        path = available(kind).get(name)
        if path is None:
            continue
        cls = resolve(kind, name)
        if isinstance(cls, type) and issubclass(cls, bases):
            return path
    return None


def names_for(base: type | tuple) -> list[str]:
    """Registered names (plugins included) whose class is a subclass of ``base``; for messages.
    Names whose class cannot be imported are left out."""
    bases = tuple(b for b in (base if isinstance(base, tuple) else (base,)) if isinstance(b, type))
    names = []
    for kind in KINDS:
        for name in available(kind):
            try:
                cls = resolve(kind, name)
            except RegistryError:
                continue
            if isinstance(cls, type) and issubclass(cls, bases):
                names.append(name)
    return names


def load_plugins() -> list[str]:
    """Import every installed plugin so class names resolve; returns the failures as messages."""
    failures = []
    for kind in KINDS:
        for name, ep in plugin_entry_points(kind).items():
            try:
                ep.load()
            except Exception as exc:
                failures.append(f"{kind} plugin {name!r} ({ep.value}): {type(exc).__name__}: {exc}")
    return failures
