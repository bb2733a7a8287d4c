"""What the small commands share about their options: help that shows the defaults, and checks
of values (output paths, seeds, escapes) made before any work, each failing as one line."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

from hmrnn_lightning.commands.runs import fail

#: the seeds ``torch.manual_seed`` takes (it refuses larger ones with a RuntimeError)
SEED_MAX = 2**64 - 1


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with ``(default: ...)`` after each option that has a default to show: not
    after a required option, a flag (default False), a default of None, or an empty text or list."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        default = action.default
        empty = isinstance(default, (str, list)) and not default
        if action.required or default is None or default is False or empty or default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def check_output_file(path: str, flag: str = "--out") -> None:
    """A file the command will write: not an existing folder, under a folder that is one (or can
    be made) and may be written in."""
    if Path(path).is_dir():
        fail(f"{flag} {path} is a folder; give a file name")
    _check_writable_below(Path(path).parent, flag, path)


def check_output_folder(path: str, flag: str = "--out") -> None:
    """A folder the command will write into: not an existing file, and one that can be made (or
    exists) and may be written in."""
    if Path(path).exists() and not Path(path).is_dir():
        fail(f"{flag} {path} is a file; give a folder")
    _check_writable_below(Path(path), flag, path)


def _check_writable_below(folder: Path, flag: str, path: str) -> None:
    """``folder`` can be made (or exists) and written in (:func:`~hmrnn_lightning.checks.writable_problem`)."""
    from hmrnn_lightning.checks import writable_problem

    problem = writable_problem(folder)
    if problem is not None:
        fail(f"{flag} {path}: {problem}")


def check_seed(seed: int | None, flag: str = "--seed") -> None:
    """A seed ``torch.manual_seed`` takes: 0 to 2**64 - 1."""
    if seed is not None and not 0 <= seed <= SEED_MAX:
        fail(f"{flag} must be from 0 to 2**64 - 1, got {seed}")


def decode_escapes(text: str, flag: str) -> str:
    r"""``\n``, ``\t``, ``\\`` (and Python's other escapes) in a command-line text, every other
    character kept as it is, non-ASCII included. An escape that cannot be read is one line."""
    if "\\" not in text:
        return text
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # "\d" and such stay as written
            # non-Latin-1 characters travel as \uXXXX escapes and come back as themselves
            return text.encode("latin-1", "backslashreplace").decode("unicode_escape")
    except UnicodeDecodeError as exc:
        fail(f"{flag} {text!r}: cannot read its escapes ({exc.reason}); write a backslash itself as \\\\")
        raise AssertionError("unreachable")  # fail exits; for type checkers
