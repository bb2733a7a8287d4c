"""A synthetic corpus with a known three-level hierarchy: words, phrases, sentences."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hmrnn_lightning.data.base import CharStreamDataModule

LEVELS = ("word", "phrase", "sentence")
LETTERS = "abcdefghijklmnopqrstuvwxyz"  # the default alphabet


@dataclass
class SyntheticCorpus:
    """Text plus, for every level, a 0/1 array marking the last character of each unit."""

    text: str
    boundaries: dict[str, np.ndarray]


def generate_corpus(
    num_chars: int, seed: int = 0, lexicon_size: int = 60, num_phrases: int = 40, spaces: bool = True,
    alphabet: str = LETTERS, words_per_slot: int = 1,
) -> SyntheticCorpus:
    """Characters form words from a lexicon, words form phrases, phrases form sentences.

    * the lexicon holds ``lexicon_size`` distinct random words of 2-7 letters;
    * a phrase is a fixed sequence of 2-4 slots (``num_phrases`` of them); a slot holds
      ``words_per_slot`` distinct lexicon words and each occurrence of the phrase draws one of
      them uniformly. With the default 1 a phrase is a fixed word sequence, so only its first
      word is uncertain; with more, every word end is followed by a real choice;
    * a sentence is 2-4 phrases drawn with Zipf-like frequencies (probability ~ 1/rank),
      followed by ``.`` and a newline.

    With ``spaces`` words are separated by a space (a word unit ends with its space);
    without, words are written back to back, like Chinese or Japanese text. A unit's
    boundary is its last character; a phrase ends at a word end and a sentence at a
    phrase end (the ``.\\n`` belongs to the sentence's last word), so the levels nest.
    """
    rng = np.random.default_rng(seed)
    lexicon: list[str] = []
    seen = set()
    while len(lexicon) < lexicon_size:
        word = "".join(rng.choice(list(alphabet), size=int(rng.integers(2, 8))))
        if word not in seen:
            seen.add(word)
            lexicon.append(word)
    word_p = 1.0 / np.arange(1, lexicon_size + 1)
    word_p /= word_p.sum()
    phrases = [list(rng.choice(lexicon_size, size=int(rng.integers(2, 5)), p=word_p)) for _ in range(num_phrases)]
    if words_per_slot < 1 or words_per_slot > lexicon_size:
        raise ValueError(f"words_per_slot must be between 1 and lexicon_size ({lexicon_size}), got {words_per_slot}")
    # drawn after the phrases, and only when a slot has a choice, so that the default corpus is unchanged
    slots = None
    if words_per_slot > 1:
        slots = [[[w] + [int(v) for v in rng.choice([u for u in range(lexicon_size) if u != w], size=words_per_slot - 1,
                                                   replace=False)] for w in words] for words in phrases]
    phrase_p = 1.0 / np.arange(1, num_phrases + 1)
    phrase_p /= phrase_p.sum()

    chunks: list[str] = []
    marks = {level: [] for level in LEVELS}
    length = 0
    while length < num_chars:
        sentence = rng.choice(num_phrases, size=int(rng.integers(2, 5)), p=phrase_p)
        for pi, phrase in enumerate(sentence):
            words = phrases[phrase] if slots is None else [c[int(rng.integers(words_per_slot))] for c in slots[phrase]]
            for wi, w in enumerate(words):
                last_of_sentence = pi == len(sentence) - 1 and wi == len(words) - 1
                unit = lexicon[w] + (".\n" if last_of_sentence else (" " if spaces else ""))
                chunks.append(unit)
                length += len(unit)
                end = length - 1
                marks["word"].append(end)
                if wi == len(words) - 1:
                    marks["phrase"].append(end)
                if last_of_sentence:
                    marks["sentence"].append(end)
    text = "".join(chunks)
    out = {}
    for level in LEVELS:
        arr = np.zeros(len(text), dtype=np.uint8)
        arr[marks[level]] = 1
        out[level] = arr
    return SyntheticCorpus(text, out)


class SyntheticDataModule(CharStreamDataModule):
    """The generated hierarchical corpus, split 90/5/5 by position; needs no files.

    Args:
        num_chars: corpus length.
        seed: the corpus is a deterministic function of the seed and the sizes.
        lexicon_size: distinct words.
        num_phrases: distinct phrases.
        spaces: separate words with spaces (False: boundaries must be discovered).
        words_per_slot: lexicon words each position of a phrase chooses from, uniformly at
            every occurrence (1: phrases are fixed word sequences).
        alphabet: the letters words are spelt with. With few letters many words share
            their first letters, so a word is known only near its end (with the 26 letters
            of the default, its first one or two letters name it).
        batch_size: streams per batch.
        seq_len: window length.
        eval_batch_size: streams for validation / test.
        cache_dir: cache folder.
    """

    name = "synthetic"

    def __init__(
        self,
        num_chars: int = 200_000,
        seed: int = 0,
        lexicon_size: int = 60,
        num_phrases: int = 40,
        spaces: bool = True,
        words_per_slot: int = 1,
        alphabet: str = LETTERS,
        batch_size: int = 32,
        seq_len: int = 100,
        eval_batch_size: int | None = None,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__(batch_size, seq_len, eval_batch_size, cache_dir)
        self.settings = dict(num_chars=num_chars, seed=seed, lexicon_size=lexicon_size, num_phrases=num_phrases, spaces=spaces)
        if words_per_slot != 1:  # absent by default, so that the default's cache key is unchanged
            self.settings["words_per_slot"] = words_per_slot
        if alphabet != LETTERS:  # absent by default, as words_per_slot is
            if len(set(alphabet)) != len(alphabet) or not alphabet or any(not ch.isalpha() for ch in alphabet):
                raise ValueError(f"alphabet must be distinct letters, got {alphabet!r}")
            self.settings["alphabet"] = alphabet
        self._corpus: SyntheticCorpus | None = None

    @property
    def corpus(self) -> SyntheticCorpus:
        if self._corpus is None:
            self._corpus = generate_corpus(**self.settings)
        return self._corpus

    def cache_key(self) -> str:
        return f"synthetic:{sorted(self.settings.items())}"

    def _bounds(self) -> tuple[int, int]:
        n = len(self.corpus.text)
        return int(n * 0.9), int(n * 0.95)

    def read_splits(self):
        a, b = self._bounds()
        t = self.corpus.text
        return {"train": t[:a], "valid": t[a:b], "test": t[b:]}

    def boundary_levels(self) -> list[str]:
        return list(LEVELS)

    def boundary_labels(self, split: str):
        import torch

        marks = self.split_boundaries(split)
        return torch.from_numpy(np.stack([marks[level] for level in LEVELS], axis=-1))

    def split_boundaries(self, split: str) -> dict[str, np.ndarray]:
        """Known boundaries of a split, aligned with :meth:`split_ids`."""
        a, b = self._bounds()
        sl = {"train": slice(0, a), "valid": slice(a, b), "test": slice(b, None)}[split]
        return {level: arr[sl] for level, arr in self.corpus.boundaries.items()}
