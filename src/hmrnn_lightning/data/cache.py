"""Where prepared data is cached, how it is published, and what the user is told meanwhile.

The cache lives in the user's cache directory, as ``datasets`` and torch hub keep theirs, so a
data folder may be read-only (a shared mount, a container volume):

1. the datamodule's ``cache_dir`` argument, when given;
2. else ``$HMRNN_CACHE_DIR``;
3. else ``$XDG_CACHE_HOME/hmrnn-lightning``;
4. else ``~/.cache/hmrnn-lightning``.

Every entry is built in a temporary name beside its final place and renamed into place, so
an interrupted build leaves nothing half-written, and two processes building the same entry
at once (two ``hmrnn fit`` on a new cache, or several DDP nodes) both finish with one whole
copy: the first rename wins and the other process uses the winner's copy. A disk that fills
up while an entry is written is one :class:`CacheError` naming the cache folder, and the
partial entry is removed.

Each file of an entry is recorded with its size and CRC-32 (:func:`file_record`), so a damaged
entry (truncated, edited, a file deleted) is found when it is opened and replaced: the whole
CRC-32 is cheap enough to check on every open (measured: about 40 ms for enwik8's 100 MB read
from the page cache, one core, zlib), so the whole file is checked, not samples of it.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
import tempfile
import zlib
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

from lightning.pytorch.utilities import rank_zero_info

from hmrnn_lightning.data.errors import DataError

ENV_VAR = "HMRNN_CACHE_DIR"
APP_NAME = "hmrnn-lightning"

T = TypeVar("T")


class CacheError(DataError):
    """The cache cannot be written where it should go."""


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding all caches (see the module docstring for the order of precedence)."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / APP_NAME


def writable_parent(final: Path) -> Path:
    """Create ``final``'s parent, or raise one clear :class:`CacheError` saying how to move the cache.
    Called before the work of building an entry, and again when publishing it."""
    parent = final.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=parent, prefix=".write-test-")
        probe.close()
    except OSError as exc:
        raise CacheError(
            f"cannot write the data cache in {parent} ({exc.strerror or exc}); give a writable folder with "
            f"--data.init_args.cache_dir or the {ENV_VAR} environment variable"
        ) from None
    return parent


def _no_space(exc: OSError, parent: Path) -> None:
    """Raise a full disk while writing in ``parent`` as one :class:`CacheError`; other errors stay as they are."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise CacheError(
            f"no space left for the data cache in {parent} ({exc.strerror or exc}); free space there, or move "
            f"the cache with --data.init_args.cache_dir or the {ENV_VAR} environment variable"
        ) from None


def publish_dir(final: Path, fill: Callable[[Path], None], replacing: int | None = None) -> None:
    """Build the folder ``final`` with ``fill(tmp_folder)`` and rename it into place.

    If another process published ``final`` first (its rename won), that copy is kept and ours
    is discarded: both are built from the same source, so either is whole and right.

    Args:
        final: where the folder goes.
        fill: writes the folder's files into the temporary folder it is given.
        replacing: the inode of a damaged folder now at ``final``; it is removed once the new
            copy is whole, unless another process has already replaced it.

    Raises:
        CacheError: the cache folder cannot be written, or its disk is full.
    """
    parent = writable_parent(final)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=parent))
    try:
        try:
            fill(tmp)
        except OSError as exc:
            _no_space(exc, parent)
            raise
        if replacing is not None:
            discard_dir(final, replacing)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # not another process's finished copy: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish_file(final: Path, write: Callable[[Path], None], suffix: str = "") -> None:
    """Write the file ``final`` with ``write(tmp_path)`` and rename it into place (atomic on POSIX)."""
    parent = writable_parent(final)
    fd, name = tempfile.mkstemp(prefix=final.name + ".tmp-", suffix=suffix, dir=parent)
    os.close(fd)
    tmp = Path(name)
    try:
        try:
            write(tmp)
        except OSError as exc:
            _no_space(exc, parent)
            raise
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def discard_dir(path: Path, inode: int | None = None) -> None:
    """Remove the folder ``path``: renamed aside first (atomic), so no reader or builder ever sees
    it half-deleted. With ``inode``, only the folder that had that inode is removed: another
    process may already have put a whole copy in its place.

    Raises:
        CacheError: the folder cannot be moved (saying to delete it by hand).
    """
    try:
        if inode is not None and path.stat().st_ino != inode:
            return
        trash = Path(tempfile.mkdtemp(prefix=path.name + ".damaged-", dir=path.parent))
        os.rename(path, trash / "entry")
    except FileNotFoundError:
        return  # already removed by another process
    except OSError as exc:
        raise CacheError(f"cannot remove the damaged data cache entry {path} ({exc.strerror or exc}); delete that folder") from None
    shutil.rmtree(trash, ignore_errors=True)


def file_crc32(path: Path, chunk: int = 1 << 22) -> int:
    """CRC-32 of the whole file, read in 4 MiB pieces (memory stays small for any file size)."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def file_record(path: Path) -> dict[str, int]:
    """What :func:`file_problem` checks a file against later: its size and CRC-32."""
    return {"bytes": path.stat().st_size, "crc32": file_crc32(path)}


def file_problem(path: Path, record: dict[str, int]) -> str | None:
    """What is wrong with ``path`` compared with its :func:`file_record`, or ``None`` if nothing."""
    if not path.is_file():
        return f"{path.name} is missing"
    size = path.stat().st_size
    if size != record.get("bytes"):
        return f"{path.name} is {size} bytes, {record.get('bytes')} were written"
    if file_crc32(path) != record.get("crc32"):
        return f"{path.name} does not hold what was written (checksum differs)"
    return None


def rebuild_damaged(path: Path, problem: str, rebuild: Callable[[], None], what: str = "entry", delete: str = "folder") -> None:
    """Say (rank 0) that the cache ``what`` at ``path`` is damaged and ``rebuild()`` it.

    Raises:
        CacheError: the cache folder itself cannot be written (its message says how to move it).
        DataError: it cannot be rebuilt (the source is gone); the message says to delete ``path``.
    """
    rank_zero_info(f"hmrnn: the data cache {what} {path} is damaged ({problem}); rebuilding it")
    try:
        rebuild()
    except CacheError:
        raise
    except DataError as exc:
        raise DataError(
            f"the data cache {what} {path} is damaged ({problem}) and cannot be rebuilt: {exc}; delete that {delete}"
        ) from None


def announce(what: str, where: Path) -> None:
    """One line, on rank 0, saying what is being prepared and where it is cached."""
    rank_zero_info(f"hmrnn: preparing {what} once; caching it in {where}")


def progress(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """``items`` with a tqdm bar (the library behind Lightning's default progress bar) on stderr.

    The bar shows only on a terminal, so logs and CI output stay clean; :func:`announce` says
    what is happening in every case.
    """
    from tqdm.auto import tqdm

    yield from tqdm(items, desc=desc, total=total, unit=unit, disable=None, file=sys.stderr, leave=False, dynamic_ncols=True)
