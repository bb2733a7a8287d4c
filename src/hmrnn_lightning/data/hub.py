"""Fetching corpora from the Hugging Face hub through ``datasets`` (imported only here)."""

from __future__ import annotations

import os

from hmrnn_lightning.data.base import DataError

HUB_SPLITS = {"train": "train", "valid": "validation", "test": "test"}


def _offline() -> bool:
    return os.environ.get("HF_DATASETS_OFFLINE", "0").lower() in {"1", "true", "yes"} or os.environ.get(
        "HF_HUB_OFFLINE", "0"
    ).lower() in {"1", "true", "yes"}


def load_hub_dataset(name: str, config: str | None, hint: str):
    """``datasets.load_dataset(name, config)`` with one clear error when it cannot work."""
    if _offline():
        raise DataError(f"the local files are missing and the hub is off (HF_DATASETS_OFFLINE): {hint}")
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets is a dependency
        raise DataError(f"'datasets' is not installed, so {name} cannot be fetched: {hint}") from exc
    try:
        return datasets.load_dataset(name, config)
    except Exception as exc:
        raise DataError(f"could not fetch {name!r} from the Hugging Face hub ({type(exc).__name__}: {exc}); {hint}") from None


def fetch_splits(name: str, field: str, hint: str, config: str | None = None) -> dict[str, str]:
    """The hub dataset's train/validation/test rows joined into one text per split, a row a line."""
    ds = load_hub_dataset(name, config, hint)
    out = {}
    for ours, theirs in HUB_SPLITS.items():
        if theirs not in ds:
            raise DataError(f"hub dataset {name!r} has no {theirs!r} split; {hint}")
        out[ours] = "\n".join(ds[theirs][field]) + "\n"
    return out


def fetch_single_text(name: str, field: str, hint: str, config: str | None = None) -> str:
    """All rows of every split of a hub dataset, concatenated in order (for corpora split by position)."""
    ds = load_hub_dataset(name, config, hint)
    parts = []
    for split in ds:
        parts.extend(ds[split][field])
    return "\n".join(parts)
