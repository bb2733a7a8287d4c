"""Any local text, and the Text8 and enwik8 corpora split by position."""

from __future__ import annotations

import codecs
import zipfile
import zlib
from pathlib import Path

from hmrnn_lightning.data.base import CharStreamDataModule, DataError, read_text_file


def split_by_fraction(seq, fractions: list[float]) -> dict[str, object]:
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise DataError(f"split must be three non-negative fractions summing to 1, got {fractions}")
    n = len(seq)
    a = int(n * fractions[0])
    b = a + int(n * fractions[1])
    return {"train": seq[:a], "valid": seq[a:b], "test": seq[b:]}


def split_by_count(seq, train: int, valid: int, test: int, what: str) -> dict[str, object]:
    if len(seq) < train + valid + test:
        raise DataError(f"{what} has {len(seq)} symbols, fewer than the {train + valid + test} its split needs")
    return {"train": seq[:train], "valid": seq[train : train + valid], "test": seq[train + valid : train + valid + test]}


ZIP_MAGIC = b"PK\x03\x04"


def read_maybe_zipped(path: Path, member: str | None = None) -> bytes:
    """Bytes of ``path``, or of ``member`` (default: the only file) inside a zip archive.

    Raises:
        DataError: the archive is truncated or damaged (a cut-off download would otherwise be
            read as the corpus itself), or it is not clear which member to read.
    """
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                names = [n for n in zf.namelist() if not n.endswith("/")]
                name = member if member in names else (names[0] if len(names) == 1 else None)
                if name is None:
                    raise DataError(f"{path}: cannot tell which of {names[:5]} to read")
                return zf.read(name)
        except (zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError) as exc:
            raise DataError(f"{path} is a damaged zip archive ({exc}); download it again") from None
    data = path.read_bytes()
    if data.startswith(ZIP_MAGIC):  # a zip without its end record: a download cut short
        raise DataError(f"{path} is a truncated zip archive (its end is missing); download it again")
    return data


def check_text_encoding(encoding: str) -> None:
    """Raise a ``ValueError`` saying why ``encoding`` cannot decode text files, if it cannot.

    Python knows codecs that are not text encodings (``rot13`` maps text to text, ``base64``
    and ``zip`` bytes to bytes); ``bytes.decode`` refuses them with a ``LookupError``.
    """
    try:
        info = codecs.lookup(encoding)
    except LookupError:
        reason = "unknown"
    else:
        if getattr(info, "_is_text_encoding", True):
            return
        reason = "a Python codec but not a text encoding"
    raise ValueError(
        f"encoding {encoding!r} is {reason}; give a text encoding (utf-8, latin-1, ascii...) or bytes to read byte values"
    )


class TextDataModule(CharStreamDataModule):
    """Characters of any local text: one file cut by ``split`` fractions, or three files.

    Args:
        train_file: the training text (or the whole text when ``valid_file`` is not given).
        valid_file: validation text.
        test_file: test text.
        split: fractions for train/valid/test when only ``train_file`` is given.
        encoding: text encoding; ``bytes`` reads byte values as symbols.
        batch_size: streams per batch.
        seq_len: window length.
        eval_batch_size: streams for validation / test.
        cache_dir: cache folder.
        remove_separators: drop spaces and ends of line, so words run together, and label each
            word's last character as a word end (the gold boundaries to discover).
    """

    name = "text"

    def __init__(
        self,
        train_file: str,
        valid_file: str | None = None,
        test_file: str | None = None,
        split: list[float] = [0.9, 0.05, 0.05],  # noqa: B006 - a plain list default is what LightningCLI shows
        encoding: str = "utf-8",
        batch_size: int = 32,
        seq_len: int = 100,
        eval_batch_size: int | None = None,
        cache_dir: str | None = None,
        remove_separators: bool = False,
    ) -> None:
        super().__init__(batch_size, seq_len, eval_batch_size, cache_dir, remove_separators)
        self.train_file, self.valid_file, self.test_file = train_file, valid_file, test_file
        self.split = list(split)
        if encoding != "bytes":
            check_text_encoding(encoding)
        self.encoding = encoding
        if (valid_file is None) != (test_file is None):
            raise ValueError("TextDataModule: give both valid_file and test_file, or neither")

    def _paths(self) -> list[Path]:
        return [Path(p) for p in (self.train_file, self.valid_file, self.test_file) if p is not None]

    def cache_key(self) -> str:
        stats = [f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in self._paths() if p.exists()]
        return f"text:{stats}:{self.split}:{self.encoding}"

    def _read(self, path: Path):
        if self.encoding == "bytes":
            if not path.is_file():
                raise DataError(f"file not found: {path}")
            data = read_maybe_zipped(path)
            if not data:
                raise DataError(f"{path} is empty")
            return [chr(b) for b in data]
        return read_text_file(path, self.encoding)

    def read_splits(self):
        if self.valid_file is None:
            return split_by_fraction(self._read(Path(self.train_file)), self.split)
        return {s: self._read(Path(p)) for s, p in zip(("train", "valid", "test"), self._paths())}


class Text8DataModule(CharStreamDataModule):
    """Text8: 100M characters of Wikipedia, 27 symbols, split 90M / 5M / 5M (Mikolov et al. 2012).

    Reads ``text8`` or ``text8.zip`` from ``data_dir``; otherwise fetches ``hub_name`` with ``datasets``.

    Args:
        data_dir: folder holding ``text8`` or ``text8.zip``.
        hub_name: hub dataset used when the file is absent.
        batch_size: streams per batch (the paper: 128).
        seq_len: window length.
        eval_batch_size: streams for validation / test.
        cache_dir: cache folder.
        split_sizes: symbols in train / valid / test, taken in order from the start of the file.
        remove_separators: drop the spaces, so words run together, and label each word's last
            letter as a word end (``split_sizes`` count the text with its spaces).
    """

    name = "text8"
    add_unknown = False

    def __init__(
        self,
        data_dir: str = "data/text8",
        hub_name: str = "afmck/text8",
        batch_size: int = 128,
        seq_len: int = 100,
        eval_batch_size: int | None = None,
        cache_dir: str | None = None,
        split_sizes: list[int] = [90_000_000, 5_000_000, 5_000_000],  # noqa: B006 - shown as is by --help
        remove_separators: bool = False,
    ) -> None:
        super().__init__(batch_size, seq_len, eval_batch_size, cache_dir, remove_separators)
        self.data_dir = Path(data_dir)
        self.hub_name = hub_name
        if len(split_sizes) != 3 or any(int(n) <= 0 for n in split_sizes):
            raise ValueError(f"{type(self).__name__}: split_sizes must be three positive counts, got {split_sizes}")
        self.sizes = tuple(int(n) for n in split_sizes)

    def cache_key(self) -> str:
        """The local file's path, size and modification time (a replaced file makes a new cache),
        or the hub name when there is no local file."""
        path = self.local_file()
        source = f"{path.resolve()}:{path.stat().st_size}:{path.stat().st_mtime_ns}" if path else f"hub:{self.hub_name}"
        return f"{self.name}:{source}:{self.sizes}"

    def describe(self) -> str:
        path = self.local_file()
        return f"{self.name} ({path if path else 'hub dataset ' + self.hub_name})"

    def local_file(self) -> Path | None:
        for candidate in (self.name, f"{self.name}.zip"):
            if (self.data_dir / candidate).is_file():
                return self.data_dir / candidate
        return None

    def read_corpus(self):
        path = self.local_file()
        if path is not None:
            data = read_maybe_zipped(path, self.name)
            try:
                return data.decode("ascii")
            except UnicodeDecodeError as exc:
                raise DataError(
                    f"{path} is not Text8: byte {exc.start} is {data[exc.start]:#04x}, not ASCII text; "
                    f"give text8 or text8.zip as published (27 symbols: a-z and space)"
                ) from None
        from hmrnn_lightning.data.hub import fetch_single_text

        return fetch_single_text(self.hub_name, "text", hint=f"put {self.name} or {self.name}.zip in {self.data_dir}")

    def read_splits(self):
        return split_by_count(self.read_corpus(), *self.sizes, what=self.name)


class Enwik8DataModule(Text8DataModule):
    """enwik8 (Hutter Prize): the first 100M bytes of Wikipedia XML read as bytes, split
    90M / 5M / 5M (Graves 2013); 205 distinct byte values occur.

    Args:
        data_dir: folder holding ``enwik8`` or ``enwik8.zip``.
        hub_name: hub dataset used when the file is absent (its ``enwik8-raw`` config).
        batch_size: streams per batch (the paper: 128).
        seq_len: window length.
        eval_batch_size: streams for validation / test.
        cache_dir: cache folder.
        split_sizes: bytes in train / valid / test, taken in order from the start of the file.
        remove_separators: drop spaces and ends of line and label each word's last byte as a word
            end (``split_sizes`` count the bytes as written).
    """

    name = "enwik8"
    add_unknown = True  # the test split has a few byte values the training split lacks

    def __init__(
        self,
        data_dir: str = "data/enwik8",
        hub_name: str = "LTCB/enwik8",
        batch_size: int = 128,
        seq_len: int = 100,
        eval_batch_size: int | None = None,
        cache_dir: str | None = None,
        split_sizes: list[int] = [90_000_000, 5_000_000, 5_000_000],  # noqa: B006
        remove_separators: bool = False,
    ) -> None:
        super().__init__(data_dir, hub_name, batch_size, seq_len, eval_batch_size, cache_dir, split_sizes, remove_separators)

    def read_corpus(self):
        path = self.local_file()
        if path is not None:
            data = read_maybe_zipped(path, self.name)
        else:
            from hmrnn_lightning.data.hub import fetch_single_text

            data = fetch_single_text(
                self.hub_name, "text", config="enwik8-raw", hint=f"put enwik8 or enwik8.zip in {self.data_dir}"
            ).encode("utf-8")
        return [chr(b) for b in data]  # one symbol per byte
