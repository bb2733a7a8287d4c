"""IAM On-Line Handwriting Database: pen trajectories as (dx, dy, pen) sequences (section 4.2).

Reads the ``lineStrokes`` tree as distributed (a folder, or ``lineStrokes-all.tar.xz``/``.tar.gz``):
one XML file per handwritten line, ``<StrokeSet><Stroke><Point x= y= time=/>...``. Every line
becomes offsets ``(dx, dy)`` between consecutive points and ``pen = 1`` on the last point of each
stroke (Graves 2013). The first point's offset is (0, 0).
"""

from __future__ import annotations

import hashlib
import tarfile
import warnings
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path
from typing import Iterator, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from hmrnn_lightning.data.cache import announce, cache_root, progress, publish_file, rebuild_damaged, writable_parent
from hmrnn_lightning.data.errors import DataError

def parse_line_strokes(xml: bytes | str) -> np.ndarray:
    """``[points, 3]`` float array of absolute ``x, y`` and ``pen`` (1 on each stroke's last point).

    Raises:
        ValueError: the XML does not parse or holds no points.
    """
    root = ET.fromstring(xml)
    rows = []
    for stroke in root.iter("Stroke"):
        points = [(float(p.get("x")), float(p.get("y"))) for p in stroke.iter("Point")]
        for k, (x, y) in enumerate(points):
            rows.append((x, y, 1.0 if k == len(points) - 1 else 0.0))
    if not rows:
        raise ValueError("no points")
    return np.asarray(rows, dtype=np.float32)


def to_offsets(points: np.ndarray) -> np.ndarray:
    """Absolute points to ``(dx, dy, pen)`` offsets; the first offset is (0, 0)."""
    out = points.copy()
    out[1:, :2] = points[1:, :2] - points[:-1, :2]
    out[0, :2] = 0.0
    return out


def iter_line_files(source: str | Path) -> Iterator[tuple[str, bytes]]:
    """``(line_id, xml bytes)`` for every ``*.xml`` of a lineStrokes folder or tar archive."""
    source = Path(source)
    if source.is_dir():
        for path in sorted(source.rglob("*.xml")):
            yield path.stem, path.read_bytes()
    elif source.is_file():
        try:
            with tarfile.open(source, "r:*") as tar:
                for member in tar:
                    if member.isfile() and member.name.endswith(".xml"):
                        f = tar.extractfile(member)
                        if f is not None:
                            yield Path(member.name).stem, f.read()
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise DataError(f"{source}: cannot read the archive ({type(exc).__name__}: {exc}); partial or damaged?") from None
    else:
        raise DataError(f"IAM-OnDB strokes not found at {source}: give the lineStrokes folder or lineStrokes-all.tar.xz")


def read_lines(source: str | Path, limit: int | None = None) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """All parseable lines as offsets, and the counts of files skipped by reason (warned once)."""
    lines: dict[str, np.ndarray] = {}
    skipped = {"unparseable": 0, "no points": 0}
    for line_id, data in progress(iter_line_files(source), "parsing IAM-OnDB lines", unit="line"):
        try:
            lines[line_id] = to_offsets(parse_line_strokes(data))
        except ET.ParseError:
            skipped["unparseable"] += 1
        except (ValueError, TypeError):
            skipped["no points"] += 1
        if limit is not None and len(lines) >= limit:
            break
    if any(skipped.values()):
        warnings.warn(f"IAM-OnDB: skipped {skipped['unparseable']} XML files that do not parse and "
                      f"{skipped['no points']} with no points (of {len(lines) + sum(skipped.values())} read)", stacklevel=2)
    if not lines:
        raise DataError(f"IAM-OnDB: no usable line in {source}")
    return lines, skipped


def form_of(line_id: str) -> str:
    """``a01-000u-01`` -> ``a01-000u`` (the form ids of the official split lists)."""
    return line_id.rsplit("-", 1)[0]


class StrokeSequences(Dataset):
    """Normalised sequences; item ``k`` is ``(inputs [n-1, 3], targets [n-1, 3])``."""

    def __init__(self, sequences: list[np.ndarray], mean: np.ndarray, std: np.ndarray) -> None:
        self.sequences = sequences
        self.mean, self.std = mean, std

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, k: int):
        seq = self.sequences[k].copy()
        seq[:, :2] = (seq[:, :2] - self.mean) / self.std
        seq = torch.from_numpy(seq)
        return seq[:-1], seq[1:]


def pad_collate(items):
    """Pad to the longest sequence; ``mask`` is 1 on real steps, so no padded step counts."""
    lengths = [x.shape[0] for x, _ in items]
    T = max(lengths)
    B = len(items)
    inputs = torch.zeros(B, T, 3)
    targets = torch.zeros(B, T, 3)
    mask = torch.zeros(B, T)
    for b, (x, y) in enumerate(items):
        inputs[b, : len(x)] = x
        targets[b, : len(y)] = y
        mask[b, : len(x)] = 1
    return inputs, targets, mask


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of similar lengths: shuffle, sort within chunks of ``batch_size * bucket`` by length,
    cut into batches, shuffle the batches. Less padding, still random.

    The order is a function of ``seed`` and the epoch; the sampler moves to the next epoch as it
    hands out an epoch's last batch. With :meth:`state_dict` / :meth:`load_state_dict` (the
    epoch and the position in it) a resumed run continues with the next batch of the same order.
    """

    def __init__(self, lengths: list[int], batch_size: int, shuffle: bool, seed: int = 0, bucket: int = 50) -> None:
        self.lengths, self.batch_size, self.shuffle, self.seed, self.bucket = lengths, batch_size, shuffle, seed, bucket
        self.epoch = 0
        self._served = 0
        self._resume_at = 0

    def batches(self) -> list[list[int]]:
        """This epoch's batches, in order."""
        rng = np.random.default_rng(self.seed + self.epoch)
        order = rng.permutation(len(self.lengths)) if self.shuffle else np.arange(len(self.lengths))
        chunk = self.batch_size * self.bucket
        batches = []
        for start in range(0, len(order), chunk):
            part = sorted(order[start : start + chunk], key=lambda i: self.lengths[i])
            batches += [part[k : k + self.batch_size] for k in range(0, len(part), self.batch_size)]
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def __iter__(self):
        batches = self.batches()
        start, self._resume_at = self._resume_at, 0
        for k in range(start, len(batches)):
            self._served = k + 1
            if self._served == len(batches):  # the epoch is handed out: a checkpoint now resumes at the next
                self.epoch, self._served = self.epoch + 1, 0
            yield batches[k]

    def __len__(self) -> int:
        return (len(self.lengths) + self.batch_size - 1) // self.batch_size

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self._served, "batches": len(self), "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if (state.get("batches"), state.get("seed")) != (len(self), self.seed):
            raise ValueError(
                f"the checkpoint's batches were drawn differently ({state.get('batches')} batches, seed "
                f"{state.get('seed')}; now {len(self)}, seed {self.seed}); resume with the data settings of the run that wrote it"
            )
        self.epoch, self._resume_at = int(state["epoch"]), int(state["position"])
        self._served = self._resume_at


class ResumableLoader(DataLoader):
    """A ``DataLoader`` whose position Lightning saves in checkpoints (the batch sampler's state).

    Exact with ``num_workers=0`` (the default here): the sampler is then never ahead of the
    training step, since Lightning does not prefetch from a loader with a length.
    """

    def state_dict(self) -> dict[str, int]:
        return self.batch_sampler.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batch_sampler.load_state_dict(state)


def read_cache(path: Path) -> tuple[list[str], np.ndarray, np.ndarray] | str:
    """The line ids, lengths and points of the cache file, or what is wrong with it.

    Reading every member whole makes ``zipfile`` check its CRC-32, so a truncated or changed
    file is found here, before any of it is used.
    """
    try:
        with np.load(path) as npz:
            ids, lengths, points = list(npz["ids"]), npz["lengths"], npz["points"]
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        return str(exc) or type(exc).__name__
    if len(ids) != len(lengths) or int(lengths.sum()) != len(points) or points.ndim != 2:
        return f"its {len(ids)} lines and {len(points)} points do not agree"
    return ids, lengths, points


class IAMOnDBDataModule(pl.LightningDataModule):
    """IAM-OnDB lines as normalised ``(dx, dy, pen)`` sequences with masks.

    Splits:
      * ``paper``: all usable lines, shuffled with ``seed`` and cut 90 / 5 / 5 (floor, floor, rest);
        on the real database this gives the paper's 10,465 / 581 / 582 sequences, mean length 648;
      * ``official``: the task-1 form lists in ``splits/``: ``trainset.txt`` for training,
        ``testset_v.txt`` for validation, ``testset_t.txt`` for test (``testset_f.txt`` is left out).

    Lines shorter than ``min_length`` points are dropped. ``dx`` and ``dy`` are normalised by
    the training set's mean and standard deviation, exposed as :attr:`stats` (the CLI links it to
    the model, so it is stored in checkpoints).

    Args:
        data_dir: folder with ``lineStrokes-all.tar.xz`` (or a ``lineStrokes/`` folder) and ``splits/``.
        split: ``paper`` or ``official``.
        min_length: drop lines with fewer points.
        max_length: cut longer lines to this many points (None: keep whole lines).
        batch_size: sequences per batch.
        seed: seed of the paper split and of batch shuffling.
        cache_dir: cache folder (default: the user's cache directory; ``data_dir`` may be read-only).
    """

    def __init__(
        self,
        data_dir: str = "data/iam-ondb",
        split: Literal["paper", "official"] = "paper",
        min_length: int = 300,
        max_length: int | None = None,
        batch_size: int = 32,
        seed: int = 0,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.data_dir = Path(data_dir)
        self.split, self.min_length, self.max_length = split, min_length, max_length
        self.batch_size, self.seed, self.cache_dir = batch_size, seed, cache_dir
        self._splits: dict[str, list[np.ndarray]] | None = None
        self._ids: dict[str, list[str]] = {}
        self._stats: dict[str, list[float]] | None = None
        self._cached: tuple[list[str], np.ndarray, np.ndarray] | None = None  # the cache file, read and found whole

    def source(self) -> Path:
        for candidate in ("lineStrokes", "lineStrokes-all.tar.xz", "lineStrokes-all.tar.gz", "lineStrokes-all.tar"):
            if (self.data_dir / candidate).exists():
                return self.data_dir / candidate
        raise DataError(
            f"IAM-OnDB strokes not found in {self.data_dir}: put lineStrokes-all.tar.xz (or the extracted "
            f"lineStrokes/ folder) there, with splits/ beside it, or name the folder that has them "
            f"(--data.init_args.data_dir for fit/test, --data_dir for plot-segments)"
        )

    @property
    def cache_path(self) -> Path:
        src = self.source()
        key = f"{src.resolve()}:{src.stat().st_size}:{src.stat().st_mtime_ns}"
        return cache_root(self.cache_dir) / f"iam-lines-{hashlib.sha1(key.encode()).hexdigest()[:12]}.npz"

    def prepare_data(self) -> None:
        """Parse the strokes into the cache file if there is none; read it once per process if there
        is one, and rebuild it if it is damaged (the archive's own CRC-32s find a changed byte).

        Raises:
            DataError: the file is damaged and cannot be rebuilt (the message names the file to delete).
        """
        if self._cached is not None or self._splits is not None:  # read already
            return
        path = self.cache_path
        if not path.exists():
            self._build_cache(path)
        elif isinstance(loaded := read_cache(path), str):
            # the new file replaces the damaged one atomically once it is whole
            rebuild_damaged(path, loaded, lambda: self._build_cache(path), what="file", delete="file")
        else:
            self._cached = loaded
            return
        loaded = read_cache(path)
        if isinstance(loaded, str):  # pragma: no cover - a fresh file that does not read back is a bug
            raise RuntimeError(f"the data cache file {path} just written does not read back: {loaded}")
        self._cached = loaded

    def _build_cache(self, path: Path) -> None:
        writable_parent(path)  # fail before the minute of parsing, not after
        announce(f"IAM-OnDB strokes from {self.source()} (about a minute)", path)
        lines, _ = read_lines(self.source())
        ids = sorted(lines)
        lengths = np.array([len(lines[i]) for i in ids])

        def write(tmp: Path) -> None:
            np.savez(tmp, ids=np.array(ids), lengths=lengths, points=np.concatenate([lines[i] for i in ids]))

        publish_file(path, write, suffix=".npz")

    def _official_forms(self, name: str) -> set[str]:
        path = self.data_dir / "splits" / name
        if not path.is_file():
            raise DataError(f"official split list not found: {path}")
        return {line.strip() for line in path.read_text().splitlines() if line.strip()}

    def setup(self, stage: str | None = None) -> None:
        if self._splits is not None:
            return
        self.prepare_data()
        assert self._cached is not None
        ids, lengths, points = self._cached
        self._cached = None  # the splits below keep what they need
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        seqs = {i: points[offsets[k] : offsets[k + 1]] for k, i in enumerate(ids)}
        kept = [i for i in ids if len(seqs[i]) >= self.min_length]
        if self.split == "paper":
            order = np.random.default_rng(self.seed).permutation(len(kept))
            n_train, n_valid = int(0.9 * len(kept)), int(0.05 * len(kept))  # test takes the rest
            chosen = [kept[k] for k in order]
            names = {"train": chosen[:n_train], "valid": chosen[n_train : n_train + n_valid], "test": chosen[n_train + n_valid :]}
        else:
            lists = {"train": "trainset.txt", "valid": "testset_v.txt", "test": "testset_t.txt"}
            forms = {s: self._official_forms(f) for s, f in lists.items()}
            names = {s: [i for i in kept if form_of(i) in forms[s]] for s in lists}
        for s, n in names.items():
            if not n:
                raise DataError(f"IAM-OnDB: the {s} split is empty (split={self.split}, min_length={self.min_length})")
        cut = (lambda a: a[: self.max_length]) if self.max_length else (lambda a: a)
        self._ids = names
        self._splits = {s: [cut(seqs[i]) for i in n] for s, n in names.items()}
        train_xy = np.concatenate([a[1:, :2] for a in self._splits["train"]])
        mean, std = train_xy.mean(0), train_xy.std(0)
        self._stats = {"mean": mean.tolist(), "std": std.tolist()}

    @property
    def stats(self) -> dict[str, list[float]]:
        """Mean and standard deviation of training ``dx, dy`` (what the model undoes to draw)."""
        self.setup()
        assert self._stats is not None
        return self._stats

    def sequences(self, split: str) -> list[np.ndarray]:
        self.setup()
        assert self._splits is not None
        return self._splits[split]

    def line_ids(self, split: str) -> list[str]:
        self.setup()
        return self._ids[split]

    def dataset(self, split: str) -> StrokeSequences:
        return StrokeSequences(self.sequences(split), np.array(self.stats["mean"]), np.array(self.stats["std"]))

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        ds = self.dataset(split)
        sampler = BucketBatchSampler([len(s) - 1 for s in ds.sequences], self.batch_size, shuffle, self.seed)
        return ResumableLoader(ds, batch_sampler=sampler, collate_fn=pad_collate)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("valid", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)
