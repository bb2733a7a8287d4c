import numpy as np
import pytest

from hmrnn_lightning.data import SyntheticDataModule, generate_corpus


def test_reproducible_from_seed():
    a, b, c = generate_corpus(5000, seed=3), generate_corpus(5000, seed=3), generate_corpus(5000, seed=4)
    assert a.text == b.text and a.text != c.text
    assert all(np.array_equal(a.boundaries[k], b.boundaries[k]) for k in a.boundaries)


def test_boundaries_are_right_and_nested():
    corpus = generate_corpus(20000, seed=0)
    text = np.array(list(corpus.text))
    word, phrase, sentence = (corpus.boundaries[k].astype(bool) for k in ("word", "phrase", "sentence"))
    assert set(text[word]) == {" ", "\n"}  # a word unit ends with its separator
    assert (text == " ").sum() + (text == "\n").sum() == word.sum()
    assert np.all(word[phrase]) and np.all(phrase[sentence])  # levels nest
    assert set(text[sentence]) == {"\n"}
    assert word.sum() > phrase.sum() > sentence.sum() > 0


def test_without_spaces_boundaries_are_last_letters():
    corpus = generate_corpus(5000, seed=1, spaces=False)
    assert " " not in corpus.text
    text = np.array(list(corpus.text))
    ends = corpus.boundaries["word"].astype(bool)
    assert set(text[ends]) - {"\n"} <= set("abcdefghijklmnopqrstuvwxyz")


def test_datamodule_serves_three_levels(tmp_path):
    dm = SyntheticDataModule(num_chars=8000, batch_size=4, seq_len=25, cache_dir=str(tmp_path))
    dm.setup()
    x, y, labels = next(iter(dm.val_dataloader()))
    assert labels.shape == (4, 25, 3) and dm.boundary_levels() == ["word", "phrase", "sentence"]
    space = dm.vocab.index[" "]
    newline = dm.vocab.index["\n"]
    assert torch_equal(labels[..., 0].bool(), (x == space) | (x == newline))


def torch_equal(a, b):
    return bool((a == b).all())


def _phrases(corpus):
    """The phrase strings of a corpus, cut at its phrase boundaries."""
    ends = np.flatnonzero(corpus.boundaries["phrase"]) + 1
    return [corpus.text[a:b] for a, b in zip(np.r_[0, ends[:-1]], ends)]


def test_words_per_slot_fills_phrase_slots_from_a_choice():
    fixed = generate_corpus(30000, seed=0, num_phrases=10)
    slotted = generate_corpus(30000, seed=0, num_phrases=10, words_per_slot=3)
    assert generate_corpus(5000, seed=2, words_per_slot=1).text == generate_corpus(5000, seed=2).text
    # fixed phrases repeat as at most num_phrases strings (up to the sentence end's ".\n");
    # with 3 words per slot the same 10 phrases show many more realisations, at most 3 ** 4 each
    strip = lambda ps: {p.rstrip(".\n ") for p in ps}
    assert len(strip(_phrases(fixed))) <= 10
    assert 10 < len(strip(_phrases(slotted))) <= 10 * 3**4
    # every realisation keeps its phrase's length in words (2 to 4), and the levels still nest
    assert {len(p.split()) for p in strip(_phrases(slotted))} <= {2, 3, 4}
    text = np.array(list(slotted.text))
    word, phrase, sentence = (slotted.boundaries[k].astype(bool) for k in ("word", "phrase", "sentence"))
    assert set(text[word]) == {" ", "\n"} and (text == " ").sum() + (text == "\n").sum() == word.sum()
    assert np.all(word[phrase]) and np.all(phrase[sentence]) and set(text[sentence]) == {"\n"}


def test_words_per_slot_is_checked_and_leaves_the_default_cache_key():
    with pytest.raises(ValueError, match="words_per_slot"):
        generate_corpus(1000, words_per_slot=0)
    assert "words_per_slot" not in SyntheticDataModule().cache_key()
    assert "words_per_slot" in SyntheticDataModule(words_per_slot=2).cache_key()


def test_alphabet_spells_the_words_and_is_checked():
    dm = SyntheticDataModule(num_chars=5000, alphabet="abcd")
    assert set(dm.corpus.text) <= set("abcd .\n") and "alphabet" in dm.cache_key()
    assert "alphabet" not in SyntheticDataModule().cache_key()  # the default corpus keeps its cache
    assert SyntheticDataModule(num_chars=5000).corpus.text == generate_corpus(5000).text
    for bad in ("", "aab", "ab1"):
        with pytest.raises(ValueError, match="alphabet must be distinct letters"):
            SyntheticDataModule(alphabet=bad)
