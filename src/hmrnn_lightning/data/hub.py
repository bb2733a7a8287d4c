"""Fetching corpora from the Hugging Face hub through ``datasets`` (the ``[hub]`` extra, imported only here).

Offline mode is left to ``datasets``: with ``HF_DATASETS_OFFLINE=1`` (or ``HF_HUB_OFFLINE=1``)
it still loads a copy it has cached before, and fails only when it has none; that failure
becomes one :class:`DataError` saying where to put the files instead.
"""

from __future__ import annotations

import os

from hmrnn_lightning.data.errors import DataError

HUB_SPLITS = {"train": "train", "valid": "validation", "test": "test"}


def _offline() -> bool:
    return any(os.environ.get(v, "0").lower() in {"1", "true", "yes", "on"} for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def load_hub_dataset(name: str, config: str | None, hint: str):
    """``datasets.load_dataset(name, config)`` with one clear error when it cannot work."""
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"the local files are missing and {name} would be fetched from the Hugging Face hub, but 'datasets' "
            f"is not installed (pip install \"hmrnn-lightning[hub]\"); or {hint}"
        ) from None
    try:
        return datasets.load_dataset(name, config)
    except Exception as exc:  # datasets raises many types (ConnectionError, FileNotFoundError, its own)
        mode = "the hub is off (HF_DATASETS_OFFLINE/HF_HUB_OFFLINE) and no cached copy was found" if _offline() else (
            f"could not fetch {name!r} from the Hugging Face hub"
        )
        raise DataError(f"{mode} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); {hint}") from None


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
