"""Shared base of the character-stream datamodules: cache, vocabulary, contiguous streams."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info

from hmrnn_lightning.data.cache import (
    announce, cache_root, file_problem, file_record, progress, publish_dir, rebuild_damaged, writable_parent,
)
from hmrnn_lightning.data.errors import DataError
from hmrnn_lightning.data.streams import StreamWindows
from hmrnn_lightning.data.vocab import UNK, Vocabulary

SPLITS = ("train", "valid", "test")

__all__ = ["CharStreamDataModule", "DataError", "SPLITS", "read_text_file", "remove_word_separators"]


class CharStreamDataModule(pl.LightningDataModule):
    """Base: the text becomes symbol ids once, cached on disk with its vocabulary, and is
    served as ``batch_size`` contiguous streams cut into ``seq_len`` windows, in order.

    Subclasses implement :meth:`read_splits`, returning the three splits as sequences of
    symbols (``str`` for characters, ``list`` of symbols such as ``"\\n"``), and may set
    :meth:`fixed_vocabulary`.

    The cache is a folder holding ``train.npy``, ``valid.npy``, ``test.npy`` and
    ``vocab.json`` in the user's cache directory (see :mod:`hmrnn_lightning.data.cache`), so the
    data folder may be read-only; it is written into a temporary folder and renamed into place,
    so an interrupted build leaves nothing half-written and concurrent builds end with one whole
    copy. ``meta.json`` records each file's size and CRC-32; an entry is checked against it when
    first opened, and a damaged one (truncated, edited, a file missing) is rebuilt from the source
    (see :func:`entry_problem`). Arrays are memory-mapped on load and kept in their stored dtype (``uint8`` up to 256
    symbols); windows become ``int64`` one at a time as they are served.

    Under DDP each rank reads its own contiguous ``batch_size`` streams: the global batch is
    ``devices x batch_size`` streams, each ``1/devices`` as long as on one device.

    Known word ends (the boundary metrics' gold labels, served with validation and test
    windows): by default the positions of the separators themselves (:attr:`word_end_symbols`:
    a space and an end of line; PTB's ``_`` and end of line), so a layer that fires on the
    separator it has just read scores. With ``remove_separators`` the separators are taken out
    of the text (words written back to back, as in Chinese or Japanese, so boundaries must be
    discovered) and each word's last symbol is labelled instead (:func:`remove_word_separators`);
    the labels are computed once and cached beside the symbol ids. Text given to the trained
    model (``hmrnn sample --prime``, ``hmrnn predict``) loses its separators the same way.

    Args:
        batch_size: streams per batch (per device under DDP).
        seq_len: truncated-BPTT window length.
        eval_batch_size: streams for validation / test (default: ``batch_size``).
        cache_dir: where caches go (default: ``$HMRNN_CACHE_DIR``, else ``$XDG_CACHE_HOME/hmrnn-lightning``,
            else ``~/.cache/hmrnn-lightning``).
        remove_separators: take the word separators out of the text and label each word's last
            symbol as a word end (sizes and splits count the text as written, separators included).
    """

    name = "chars"
    #: add an unknown symbol to the vocabulary for symbols of valid/test never seen in train
    add_unknown = True

    def __init__(
        self, batch_size: int = 64, seq_len: int = 100, eval_batch_size: int | None = None, cache_dir: str | None = None,
        remove_separators: bool = False,
    ) -> None:
        super().__init__()
        self.remove_separators = bool(remove_separators)
        if batch_size <= 0 or seq_len <= 0:
            raise ValueError(f"{type(self).__name__}: batch_size and seq_len must be positive, got {batch_size}, {seq_len}")
        if eval_batch_size is not None and eval_batch_size <= 0:
            raise ValueError(f"{type(self).__name__}: eval_batch_size must be positive, or null for batch_size; got {eval_batch_size}")
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.eval_batch_size = batch_size if eval_batch_size is None else eval_batch_size
        self.cache_dir = cache_dir
        self._arrays: dict[str, np.ndarray] = {}
        self._vocab: Vocabulary | None = None
        self._checked: Path | None = None  # the cache entry found whole by this process

    #: symbols that end a word; their positions are the known "word" boundaries
    word_end_symbols: tuple[str, ...] = (" ", "\n")

    # -- to override ---------------------------------------------------------------------------
    def read_splits(self) -> dict[str, Sequence[str]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def fixed_vocabulary(self) -> Vocabulary | None:
        """A vocabulary fixed by the corpus definition, or None to take it from the train split."""
        return None

    def cache_key(self) -> str:
        """Identifies the source data and settings; a change makes a new cache."""
        return self.name

    def describe(self) -> str:
        """What is being prepared, for the line printed while the cache is built."""
        return f"the {self.name} corpus"

    # -- text given to a trained model (hmrnn sample --prime, hmrnn predict --text) --------------------
    def text_options(self) -> dict:
        """What :meth:`text_to_symbols` needs, beside the class, to read text as this datamodule
        reads its files (plain values: language-model checkpoints keep them)."""
        return {"remove_separators": True} if self.remove_separators else {}

    @classmethod
    def text_to_symbols(cls, text: str, remove_separators: bool = False, **options) -> list[str]:
        """``text``, written as this corpus's files are written, as the symbols a model trained
        on it reads: here each character is one symbol (without the separators, for a model
        trained with ``remove_separators``)."""
        symbols = list(text)
        return remove_word_separators(symbols, cls.word_end_symbols)[0] if remove_separators else symbols

    @classmethod
    def text_format(cls, **options) -> str:
        """How :meth:`text_to_symbols` wants text written, for messages about symbols a model does not know."""
        return "plain text, one symbol per character"

    # -- cache -----------------------------------------------------------------------------------------
    def _entry_key(self) -> str:
        """:meth:`cache_key` and the settings every datamodule shares that change the entry."""
        return self.cache_key() + (":remove_separators" if self.remove_separators else "")

    @property
    def cache_path(self) -> Path:
        digest = hashlib.sha1(self._entry_key().encode()).hexdigest()[:12]
        return cache_root(self.cache_dir) / f"{self.name}-{digest}"

    def _build_cache(self, replacing: int | None = None) -> None:
        """Read, encode and publish the entry; ``replacing``: the inode of a damaged entry to replace."""
        final = self.cache_path
        writable_parent(final)  # fail before the work, not after
        announce(self.describe(), final)
        splits = self.read_splits()
        word_ends: dict[str, np.ndarray] = {}
        if self.remove_separators:
            for split in SPLITS:
                if split in splits:
                    splits[split], word_ends[split] = remove_word_separators(splits[split], self.word_end_symbols)
        for split in SPLITS:
            if split not in splits or len(splits[split]) == 0:
                without = " without its separators" if self.remove_separators else ""
                raise DataError(f"{type(self).__name__}: the {split} split{without} is empty")
        vocab = self.fixed_vocabulary() or Vocabulary.from_sequence(splits["train"], UNK if self.add_unknown else None)
        arrays = {s: vocab.encode(splits[s], split=s) for s in progress(SPLITS, f"encoding {self.name}", unit="split")}

        def fill(tmp: Path) -> None:
            for split, arr in arrays.items():
                np.save(tmp / f"{split}.npy", arr)
            for split, ends in word_ends.items():
                np.save(tmp / f"{split}.word_ends.npy", ends)
            (tmp / "vocab.json").write_text(vocab.to_json())
            files = {f.name: file_record(f) for f in sorted(tmp.iterdir())}
            meta = {"key": self._entry_key(), "lengths": {s: len(a) for s, a in arrays.items()}, "files": files}
            (tmp / "meta.json").write_text(json.dumps(meta))  # written last: its presence marks a whole copy

        publish_dir(final, fill, replacing)

    def prepare_data(self) -> None:
        """Build the cache entry if there is none; check it once per process if there is one, and
        rebuild it if it is damaged.

        Raises:
            DataError: the entry is damaged and cannot be rebuilt (the message names the folder to delete).
        """
        path = self.cache_path
        if self._checked == path:
            return
        if not path.exists():
            self._build_cache()
        elif (problem := entry_problem(path)) is not None:
            try:
                inode = path.stat().st_ino
            except FileNotFoundError:  # another process removed it meanwhile
                inode = None
            rebuild_damaged(path, problem, lambda: self._build_cache(replacing=inode))
        self._checked = path

    def _load(self) -> None:
        if self._vocab is not None:
            return
        self.prepare_data()
        self._vocab = Vocabulary.load(self.cache_path / "vocab.json")
        # copy-on-write mapping: torch can wrap it without a copy (it refuses read-only arrays),
        # pages are read from the file as windows touch them, and the file is never written
        self._arrays = {s: np.load(self.cache_path / f"{s}.npy", mmap_mode="c") for s in SPLITS}

    # -- public -------------------------------------------------------------------------------------------
    @property
    def vocab(self) -> Vocabulary:
        self._load()
        assert self._vocab is not None
        return self._vocab

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def split_ids(self, split: str) -> torch.Tensor:
        """The split's symbol ids, memory-mapped in their stored dtype (``uint8`` up to 256 symbols);
        no copy is made, so index or slice it and convert what you use (``.long()``)."""
        self._load()
        return torch.from_numpy(self._arrays[split])

    def boundary_levels(self) -> list[str]:
        """Names of the known boundary levels served with validation / test windows."""
        return ["word"]

    def boundary_labels(self, split: str) -> torch.Tensor | None:
        """``[N, levels]`` 0/1: known boundaries after each symbol of ``split`` (None if unknown):
        the separators, or with ``remove_separators`` each word's last symbol (see the class)."""
        if self.remove_separators:
            self._load()
            ends = np.load(self.cache_path / f"{split}.word_ends.npy", mmap_mode="c")
            return torch.from_numpy(ends).unsqueeze(-1)
        ids = self.split_ids(split)
        ends = [self.vocab.index[s] for s in self.word_end_symbols if s in self.vocab.index]
        if not ends:
            return None
        return torch.isin(ids, torch.tensor(ends, dtype=ids.dtype)).to(torch.uint8).unsqueeze(-1)

    def setup(self, stage: str | None = None) -> None:
        self._load()

    def _rank(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def _loader(self, split: str, streams: int, drop_last: bool, labels: bool = False) -> StreamWindows:
        rank, world = self._rank()
        ids = self.split_ids(split)
        lab = self.boundary_labels(split) if labels else None
        if ids.numel() // (streams * world) <= self.seq_len and drop_last:
            raise DataError(
                f"{type(self).__name__}: seq_len {self.seq_len} is longer than each stream of the {split} split "
                f"({ids.numel()} symbols in {streams * world} streams)"
            )
        if ids.numel() // (streams * world) < 2:
            raise DataError(
                f"{type(self).__name__}: the {split} split ({ids.numel()} symbols) is too short for "
                f"{streams * world} streams; lower the batch size"
            )
        return StreamWindows(ids, streams, self.seq_len, rank, world, drop_last, labels=lab)

    # The loaders are StreamWindows themselves, not DataLoaders: sized and resumable mid-epoch
    # (see StreamWindows for why).
    def train_dataloader(self) -> StreamWindows:
        windows = self._loader("train", self.batch_size, drop_last=True)
        self.log_layout(windows)
        return windows

    def val_dataloader(self) -> StreamWindows:
        return self._loader("valid", self.eval_batch_size, drop_last=False, labels=True)

    def test_dataloader(self) -> StreamWindows:
        return self._loader("test", self.eval_batch_size, drop_last=False, labels=True)

    def __str__(self) -> str:
        # Lightning's own __str__ builds every loader (reading and caching the data) and expects
        # DataLoaders; jsonargparse formats datamodules into messages, so say what it is instead
        return f"{type(self).__name__}(batch_size={self.batch_size}, seq_len={self.seq_len}, cache={self.cache_path})"

    def log_layout(self, windows: StreamWindows) -> None:
        """Say once, on rank 0, what a training step sees: the global batch and each stream's length."""
        world = windows.world_size
        rank_zero_info(
            f"hmrnn: training batch {world * windows.data.shape[0]} streams "
            f"({windows.data.shape[0]} per device x {world} device{'s' if world > 1 else ''}), "
            f"each {windows.data.shape[1]} symbols long; {len(windows)} windows of {self.seq_len} per epoch"
        )


def remove_word_separators(symbols: Sequence[str], separators: Sequence[str]) -> tuple[Sequence[str], np.ndarray]:
    """``(symbols without the separators, word ends)``: ``word_ends[k]`` is 1 when kept symbol
    ``k`` is followed by a separator in the text as written, i.e. it ends a word (a run of
    separators, such as ``_`` then an end of line, ends one word). The last symbol of the text is
    not marked unless a separator follows it: where the text stops, the word may go on. Symbols
    are single characters (as :class:`Vocabulary` encodes them); a ``str`` stays a ``str``.
    """
    text = symbols if isinstance(symbols, str) else "".join(symbols)
    if len(text) != len(symbols):
        raise DataError(f"remove_word_separators: symbols must be single characters ({len(symbols)} symbols make {len(text)} characters)")
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    is_sep = np.isin(codes, np.array([ord(c) for c in separators], dtype=np.uint32))
    ends = np.append(is_sep[1:], False)[~is_sep].astype(np.uint8)
    kept = codes[~is_sep].tobytes().decode("utf-32-le")
    return (kept if isinstance(symbols, str) else list(kept)), ends


def entry_problem(path: Path) -> str | None:
    """What is wrong with the cache entry in ``path``, or ``None`` if it is whole.

    Checked: every file is present, each array's header and size agree with the lengths
    ``meta.json`` recorded, ``vocab.json`` parses, and each file's size and CRC-32 match what
    was written (which also rules out ids outside the vocabulary: they are the ids encoded).
    Entries written before the sizes and checksums were recorded have no ``files`` in
    ``meta.json``; they are kept, being checked for the same structure and, with a pass over
    the arrays, for ids outside the vocabulary instead, so an old cache whose source is gone
    still works.
    """
    try:
        meta = json.loads((path / "meta.json").read_text())
        lengths = meta["lengths"]
        files = meta.get("files")
        if not isinstance(lengths, dict) or not (files is None or all(isinstance(r, dict) for r in files.values())):
            raise TypeError("unexpected layout")
    except FileNotFoundError:
        return "meta.json is missing"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"meta.json cannot be read ({exc})"
    if files is not None:
        for name, record in files.items():
            if (problem := file_problem(path / name, record)) is not None:
                return problem
    try:
        vocab = Vocabulary.load(path / "vocab.json")
    except FileNotFoundError:
        return "vocab.json is missing"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"vocab.json cannot be read ({exc})"
    for split in SPLITS:
        file = path / f"{split}.npy"
        try:
            with open(file, "rb") as f:
                version = np.lib.format.read_magic(f)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, _, dtype = read_header(f)
                offset = f.tell()
        except FileNotFoundError:
            return f"{file.name} is missing"
        except (OSError, ValueError) as exc:
            return f"{file.name} is not a NumPy array file ({exc})"
        if dtype.kind not in "iu" or shape != (lengths.get(split),):
            return f"{file.name} holds {dtype} {shape}, {lengths.get(split)} symbol ids were written"
        if file.stat().st_size != offset + shape[0] * dtype.itemsize:
            return f"{file.name} is {file.stat().st_size} bytes, its header says {offset + shape[0] * dtype.itemsize}"
        if files is None and shape[0] and int(np.load(file, mmap_mode="r").max()) >= len(vocab):
            return f"{file.name} holds ids outside its vocabulary of {len(vocab)} symbols"
    return None


def read_text_file(path: Path, encoding: str = "utf-8") -> str:
    """Whole file as text, with errors that say which file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    try:
        text = path.read_text(encoding=encoding)
    except UnicodeError as exc:  # UnicodeDecodeError, or the plain UnicodeError of codecs like idna
        where = f"byte {exc.start}: {exc.reason}" if isinstance(exc, UnicodeDecodeError) else str(exc)
        with open(path, "rb") as f:
            archive = f.read(4) == b"PK\x03\x04"
        hint = "it is a zip archive: unpack it first" if archive else "give the right encoding or read it as bytes"
        raise DataError(f"{path} is not valid {encoding} text ({where}); {hint}") from None
    if not text:
        raise DataError(f"{path} is empty")
    return text
