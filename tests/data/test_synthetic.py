import numpy as np

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
