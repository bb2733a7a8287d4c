"""Surprisal peaks, matched firing rates and the word-end comparison on inputs with known answers."""

import pytest
import torch

from hmrnn_lightning.metrics.word_ends import (
    TextPass, compare_word_ends, fire_at_rate, local_peaks, offset_rates, one_symbol_later, read_text, score, stream_windows,
)
from tests.helpers import tiny_model


def test_local_peaks():
    s = torch.tensor([1.0, 3.0, 2.0, 2.0, 5.0, 5.0, 1.0, float("nan")])
    assert local_peaks(s).tolist() == [False, True, False, False, True, False, False, False]  # a plateau fires once


def known_text(n_words=40, seed=0):
    """Word ends at random positions; surprisal high (3 + noise) right at each word end, lower
    (1 + noise) peaks at other positions too, so peak-picking alone is not enough."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 7, (n_words,), generator=g)
    labels = torch.cat([torch.eye(int(k))[-1] for k in lengths])
    noise = torch.rand(labels.numel(), generator=g)
    surprisal = torch.where(labels > 0, 3.0 + noise, noise)
    surprisal[-1] = float("nan")  # no next symbol
    return labels, surprisal


def test_surprisal_peaks_at_the_gold_rate_find_every_word_end():
    labels, surprisal = known_text()
    labels[-1] = 0  # the last position cannot fire (its surprisal is NaN)
    fired = fire_at_rate(surprisal, float(labels.mean()))
    assert torch.equal(fired, labels)
    twice = fire_at_rate(surprisal, 2 * float(labels.mean()))
    row = score(twice.unsqueeze(-1), labels)[0]
    # every word end first, then other peaks (there may be fewer than asked for: the rate is then lower)
    assert row["recall"] == 1.0 and row["precision"] == pytest.approx(float(labels.sum() / twice.sum()))
    assert labels.sum() < twice.sum() <= 2 * labels.sum()
    assert fire_at_rate(surprisal, 1.0).sum() == local_peaks(surprisal).sum()  # no more than the peaks
    assert fire_at_rate(surprisal, 1.0, peaks_only=False).sum() == labels.numel() - 1  # all but the NaN


def test_compare_reports_f1_at_matched_rates():
    labels, surprisal = known_text()
    labels[-1] = 0
    n = labels.numel()
    ends = labels.nonzero().squeeze(1)
    z = torch.zeros(n, 3)
    z[:, 0] = labels  # layer 1: exactly the word ends
    z[ends[::2], 1] = 1  # layer 2: every other word end
    hm = TextPass([], z, torch.zeros(n), torch.zeros(n))
    lstm = TextPass([], torch.zeros(n, 3), surprisal, torch.rand(n))
    out = compare_word_ends(hm, lstm, labels)
    assert out["gold_rate"] == pytest.approx(float(labels.mean()))
    assert out["hm"][0]["f1"] == 1.0 and out["baseline"][0]["f1"] == 1.0
    assert out["hm"][1]["rate"] == pytest.approx(len(ends[::2]) / n)
    assert out["baseline"][1]["rate"] == pytest.approx(out["hm"][1]["rate"])  # the same firing rate
    assert out["baseline"][1]["precision"] == 1.0 and out["baseline"][1]["recall"] == pytest.approx(0.5, abs=0.03)
    # one step early: nothing exact, everything within one step
    shifted = TextPass([], torch.roll(z, -1, 0), torch.zeros(n), torch.zeros(n))
    late = compare_word_ends(shifted, lstm, labels)["hm"][0]
    assert late["f1"] == 0.0 and late["f1_tol1"] == pytest.approx(1.0, abs=0.02)
    # read one symbol later, a layer that fires on each next word's first symbol is exact
    after = TextPass([], torch.roll(z, 1, 0), torch.zeros(n), torch.zeros(n))
    later = compare_word_ends(after, lstm, labels)
    assert later["hm"][0]["f1"] == 0.0 and later["hm_next"][0]["f1"] == 1.0
    assert later["baseline_next"][0]["rate"] == pytest.approx(later["hm_next"][0]["rate"])
    assert later["offsets"][0]["+1"] == 1.0 and later["offsets"][0]["0"] == 0.0
    assert out["offsets"][0]["0"] == 1.0 and out["offsets"][1]["0"] == pytest.approx(0.5, abs=0.03)
    curve = out["pr_curve"]
    assert [p["target_rate"] for p in curve] == sorted(p["target_rate"] for p in curve)
    with pytest.raises(ValueError, match="baseline must be one of"):
        compare_word_ends(hm, lstm, labels, baseline="perplexity")


def test_read_text_aligns_surprisal_and_carries_the_state():
    model = tiny_model().eval()
    ids = torch.randint(0, 11, (50,))
    one = read_text(model, ids, window=1000, keep_hidden=True)
    pieces = read_text(model, ids, window=7, keep_hidden=True)
    assert read_text(model, ids).hidden == []
    torch.testing.assert_close(pieces.surprisal, one.surprisal, equal_nan=True)
    torch.testing.assert_close(pieces.hidden[0], one.hidden[0])
    with torch.no_grad():
        logits, out = model(ids.unsqueeze(0))
    logp = torch.log_softmax(logits[0], -1)
    torch.testing.assert_close(one.surprisal[:-1], -logp[torch.arange(49), ids[1:]])  # surprisal of the NEXT symbol
    assert torch.isnan(one.surprisal[-1])
    torch.testing.assert_close(one.entropy, -(logp.exp() * logp).sum(-1))
    assert torch.equal(one.boundaries, out.boundaries[0])


def test_stream_windows_cover_the_text_once():
    ids, labels = torch.arange(23), torch.arange(23) % 2
    windows = stream_windows(ids, labels, 5)
    assert torch.equal(torch.cat([w[0][0] for w in windows]), ids[:-1])
    assert torch.equal(torch.cat([w[1][0] for w in windows]), ids[1:])
    assert torch.equal(torch.cat([w[2][0, :, 0] for w in windows]), labels[:-1])


def test_offset_rates_and_the_later_reading_at_the_edges():
    labels = torch.tensor([0.0, 1, 0, 0, 1])  # word ends at 1 and 4 (the last symbol)
    z = torch.tensor([[1.0], [0], [1], [0], [0]])
    rows = offset_rates(z, labels, (-1, 0, 1))
    # -1: positions 0 and 3 -> 0.5; 0: positions 1 and 4 -> 0; +1: position 2 only (5 is outside) -> 1
    assert rows == [{"-1": 0.5, "0": 0.0, "+1": 1.0}]
    assert one_symbol_later(z).squeeze(1).tolist() == [0.0, 1.0, 0.0, 0.0, 0.0]
