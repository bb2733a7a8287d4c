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
copy: the first rename wins and the other process uses the winner's copy.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
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


def publish_dir(final: Path, fill: Callable[[Path], None]) -> None:
    """Build the folder ``final`` with ``fill(tmp_folder)`` and rename it into place.

    If another process published ``final`` first (its rename won), that copy is kept and ours
    is discarded: both are built from the same source, so either is whole and right.
    """
    parent = writable_parent(final)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=parent))
    try:
        fill(tmp)
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
        write(tmp)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


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
