"""Symbol vocabularies."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

UNK = "\ufffd"  # U+FFFD REPLACEMENT CHARACTER stands for symbols never seen in training


class Vocabulary:
    """An ordered list of symbols (characters, or byte values for byte corpora).

    Args:
        symbols: the symbols, id = position.
        unk: symbol that unseen symbols map to; added at the end if missing.
    """

    def __init__(self, symbols: list[str], unk: str | None = UNK) -> None:
        symbols = list(symbols)
        if len(set(symbols)) != len(symbols):
            raise ValueError("Vocabulary: symbols must be unique")
        if unk is not None and unk not in symbols:
            symbols.append(unk)
        self.symbols = symbols
        self.unk = unk
        self.index = {s: i for i, s in enumerate(symbols)}

    @classmethod
    def from_sequence(cls, seq, unk: str | None = UNK) -> "Vocabulary":
        return cls(sorted(set(seq)), unk)

    def __len__(self) -> int:
        return len(self.symbols)

    def encode(self, seq, split: str = "text") -> np.ndarray:
        """Ids of ``seq`` (a str or a list of one-character symbols); unseen symbols map to
        ``unk`` with one warning giving the count, or raise when there is no ``unk``."""
        if not all(len(sym) == 1 for sym in self.symbols):
            raise ValueError("Vocabulary.encode handles one-character symbols only")
        text = seq if isinstance(seq, str) else "".join(seq)
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        table_codes = np.array([ord(sym) for sym in self.symbols], dtype=np.uint32)
        order = np.argsort(table_codes)
        pos = np.clip(np.searchsorted(table_codes[order], codes), 0, len(order) - 1)
        known = table_codes[order][pos] == codes
        ids = order[pos]
        if not known.all():
            bad = codes[~known]
            first = int(np.flatnonzero(~known)[0])
            if self.unk is None:
                raise ValueError(
                    f"symbol {chr(int(bad[0]))!r} at position {first} of the {split} split is not in the vocabulary"
                )
            distinct = [chr(int(c)) for c in np.unique(bad)[:5]]
            warnings.warn(
                f"{bad.size} symbols of the {split} split ({np.unique(bad).size} distinct, e.g. "
                f"{', '.join(map(repr, distinct))}) never occur in the training split; they are mapped to the unknown symbol",
                stacklevel=2,
            )
            ids = np.where(known, ids, self.index[self.unk])
        return ids.astype(np.uint8 if len(self) <= 256 else np.int32)

    def decode(self, ids) -> str:
        return "".join(self.symbols[int(i)] for i in ids)

    def to_json(self) -> str:
        return json.dumps({"symbols": self.symbols, "unk": self.unk})

    @classmethod
    def from_json(cls, text: str) -> "Vocabulary":
        d = json.loads(text)
        return cls(d["symbols"], d["unk"])

    @classmethod
    def load(cls, path: Path) -> "Vocabulary":
        return cls.from_json(Path(path).read_text())
