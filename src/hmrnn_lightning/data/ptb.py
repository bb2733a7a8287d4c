"""Penn Treebank in Mikolov's character preprocessing."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from hmrnn_lightning.data.base import CharStreamDataModule, read_text_file, remove_word_separators

EOL = "\n"


def ptb_char_symbols(text: str) -> list[str]:
    """``ptb.char.*.txt``: symbols separated by spaces, ``_`` between words, one sentence a line.

    Every line becomes its symbols followed by the end-of-line symbol ``"\\n"``. Blank
    lines are skipped: the char files end with one, the word files do not.
    """
    out: list[str] = []
    for line in text.splitlines():
        if line.strip():
            out.extend(line.split())
            out.append(EOL)
    return out


def ptb_word_symbols(text: str) -> list[str]:
    """``ptb.*.txt`` (words separated by spaces) turned into the same symbols as the char files."""
    out: list[str] = []
    for line in text.splitlines():
        if line.strip():
            out.extend("_".join(line.split()))
            out.append(EOL)
    return out


class PTBDataModule(CharStreamDataModule):
    """Penn Treebank characters (Mikolov et al. 2012): 50 symbols, ``_`` between words, ``\\n`` ends a sentence.

    Reads ``ptb.char.{train,valid,test}.txt`` from ``data_dir`` (or, with ``source="word"``,
    builds the same streams from ``ptb.{train,valid,test}.txt``). When the files are absent
    the corpus is fetched with ``datasets`` (``ptb_text_only``) and converted.

    Args:
        data_dir: folder with Mikolov's files.
        source: ``char`` files or ``word`` files.
        batch_size: streams per batch (the paper: 64).
        seq_len: window length (the paper: 100).
        eval_batch_size: streams for validation / test.
        cache_dir: cache folder (default: the user's cache directory; ``data_dir`` may be read-only).
        remove_separators: drop ``_`` and the end of line, so words (and sentences) run together,
            and label each word's last character as a word end (the gold boundaries to discover).
    """

    name = "ptb"
    word_end_symbols = ("_", "\n")
    add_unknown = False  # the 50 symbols are closed; an unseen one is an error, not <unk>

    def __init__(
        self,
        data_dir: str = "data/ptb",
        source: Literal["char", "word"] = "char",
        batch_size: int = 64,
        seq_len: int = 100,
        eval_batch_size: int | None = None,
        cache_dir: str | None = None,
        remove_separators: bool = False,
    ) -> None:
        super().__init__(batch_size, seq_len, eval_batch_size, cache_dir, remove_separators)
        self.data_dir = Path(data_dir)
        self.source = source

    def text_options(self) -> dict:
        return {"source": self.source, **super().text_options()}

    @classmethod
    def text_to_symbols(cls, text: str, source: str = "char", remove_separators: bool = False, **options) -> list[str]:
        """As the files are read (:func:`ptb_char_symbols`, :func:`ptb_word_symbols`), except that a
        last line without an end of line gets none, so a prime (``t h e _``) is not ended as a
        sentence; without ``_`` and ends of line for a model trained with ``remove_separators``."""
        out = (ptb_char_symbols if source == "char" else ptb_word_symbols)(text)
        if text.split("\n")[-1].strip():
            out.pop()
        return list(remove_word_separators(out, cls.word_end_symbols)[0]) if remove_separators else out

    @classmethod
    def text_format(cls, source: str = "char", **options) -> str:
        if source == "char":
            return ("PTB's character files: symbols separated by spaces, `_` for a space between words, "
                    "one sentence a line (e.g. `t h e _ c a t`)")
        return "PTB's word files: words separated by spaces, one sentence a line (read as characters, `_` between words)"

    def files(self) -> dict[str, Path]:
        pattern = "ptb.char.{}.txt" if self.source == "char" else "ptb.{}.txt"
        return {s: self.data_dir / pattern.format(s) for s in ("train", "valid", "test")}

    def cache_key(self) -> str:
        stats = [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in self.files().values() if p.is_file()]
        return f"ptb:{self.source}:{self.data_dir.resolve()}:{stats}"

    def describe(self) -> str:
        return f"Penn Treebank ({self.source} files in {self.data_dir})"

    def read_splits(self):
        files = self.files()
        convert = ptb_char_symbols if self.source == "char" else ptb_word_symbols
        if all(p.is_file() for p in files.values()):
            return {s: convert(read_text_file(p)) for s, p in files.items()}
        missing = [str(p) for p in files.values() if not p.is_file()]
        from hmrnn_lightning.data.hub import fetch_splits

        texts = fetch_splits(
            "ptb_text_only", field="sentence",
            hint=f"put Mikolov's files {', '.join(p.name for p in files.values())} in {self.data_dir} "
            f"(missing: {', '.join(missing)}) or pass --data.data_dir",
        )
        return {s: ptb_word_symbols(t) for s, t in texts.items()}
