import torch

from hmrnn_lightning.metrics import BoundaryF1, EndNeighbourRates


def test_oracle_scores_one_and_shifted_oracle_needs_tolerance():
    true = (torch.rand(4, 200, 1) < 0.2).float()
    z = torch.cat([true, torch.zeros(4, 200, 1)], -1)  # layer 1 = oracle, top layer column
    m = BoundaryF1(1, ["word"])
    m.update(z, true)
    assert m.compute()["boundary_f1/l1_word"].item() == 1.0
    shifted = torch.roll(true, 1, dims=1)
    strict, loose = BoundaryF1(1, ["word"]), BoundaryF1(1, ["word"], tolerance=1)
    strict.update(shifted, true)
    loose.update(shifted, true)
    assert strict.compute()["boundary_f1/l1_word"].item() < 0.35
    assert loose.compute()["boundary_f1/l1_word"].item() > 0.97


def test_random_detector_scores_chance():
    torch.manual_seed(0)
    q, r = 0.2, 0.3  # true boundary rate, prediction rate
    true = (torch.rand(8, 5000, 1) < q).float()
    pred = (torch.rand(8, 5000, 1) < r).float()
    m = BoundaryF1(1, ["word"])
    m.update(pred, true)
    out = m.compute()
    # independent: precision = q, recall = r, F1 = 2qr / (q + r) = 0.24; with ~8000 true and
    # ~12000 predicted boundaries each estimate has sd < 0.0055, so 0.02 is about 4 sd
    assert abs(out["boundary_precision/l1_word"].item() - q) < 0.02
    assert abs(out["boundary_recall/l1_word"].item() - r) < 0.02
    assert abs(out["boundary_f1/l1_word"].item() - 2 * q * r / (q + r)) < 0.02


def test_layers_and_levels_are_scored_separately():
    true = torch.zeros(1, 6, 2)
    true[0, [1, 3, 5], 0] = 1  # words
    true[0, [5], 1] = 1  # phrase
    z = torch.zeros(1, 6, 3)
    z[0, [1, 3, 5], 0] = 1
    z[0, [5], 1] = 1
    m = BoundaryF1(2, ["word", "phrase"])
    m.update(z, true)
    out = m.compute()
    assert out["boundary_f1/l1_word"] == 1 and out["boundary_f1/l2_phrase"] == 1
    assert abs(out["boundary_precision/l1_phrase"].item() - 1 / 3) < 1e-6
    assert abs(out["boundary_recall/l2_word"].item() - 1 / 3) < 1e-6


def test_tolerance_pairs_one_to_one():
    """A detector firing at t - 1, t and t + 1 around every true boundary is not perfect."""
    true = torch.zeros(1, 40, 1)
    true[0, [5, 15, 25, 35], 0] = 1
    smeared = torch.zeros(1, 40, 2)
    for t in (5, 15, 25, 35):
        smeared[0, t - 1 : t + 2, 0] = 1
    m = BoundaryF1(1, ["word"], tolerance=1)
    m.update(smeared, true)
    out = m.compute()
    assert abs(out["boundary_precision/l1_word"].item() - 4 / 12) < 1e-6
    assert out["boundary_recall/l1_word"].item() == 1.0
    assert abs(out["boundary_f1/l1_word"].item() - 0.5) < 1e-6


def test_tolerance_matching_is_maximal():
    """Predictions at 4 and 6 with true boundaries at 5 and 7: pairing 4-5 and 6-7 gives two
    pairs; pairing greedily 6-5 would leave one."""
    true = torch.zeros(1, 10, 1)
    true[0, [5, 7], 0] = 1
    z = torch.zeros(1, 10, 2)
    z[0, [4, 6], 0] = 1
    m = BoundaryF1(1, ["word"], tolerance=1)
    m.update(z, true)
    assert m.compute()["boundary_f1/l1_word"].item() == 1.0


def test_tolerance_matches_brute_force_on_random_sequences():
    import itertools

    from hmrnn_lightning.metrics.boundary_f1 import matched_pairs

    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        pred = torch.nonzero(torch.rand(9, generator=g) < 0.4).flatten().tolist()
        true = torch.nonzero(torch.rand(9, generator=g) < 0.4).flatten().tolist()
        best = 0
        for r in range(min(len(pred), len(true)), 0, -1):  # largest set of disjoint pairs
            if any(
                all(abs(p - t) <= 1 for p, t in zip(ps, ts))
                for ps in itertools.combinations(pred, r) for ts in itertools.permutations(true, r)
            ):
                best = r
                break
        assert matched_pairs(pred, true, 1) == best, (pred, true)


def test_end_neighbour_rates_tell_late_from_early():
    # word ends at 2 and 5 of one window; layer 1 fires one symbol late, layer 2 one early
    ends = torch.zeros(1, 8, 2)
    ends[0, [2, 5], 0] = 1.0
    ends[0, 7, 1] = 1.0  # another level: not read
    z = torch.zeros(1, 8, 3)
    z[0, [3, 6], 0] = 1.0
    z[0, [1, 4], 1] = 1.0
    m = EndNeighbourRates(num_layers=2, level=0)
    m.update(z, ends)
    out = {k: v.item() for k, v in m.compute().items()}
    assert out == {"boundary_rate_before_end/l1": 0.0, "boundary_rate_after_end/l1": 1.0,
                   "boundary_rate_before_end/l2": 1.0, "boundary_rate_after_end/l2": 0.0}
    # an end on a window's first step has no symbol before it there (and the last none after)
    m.reset()
    edge = torch.zeros(1, 4, 1)
    edge[0, 0, 0] = edge[0, 3, 0] = 1.0
    m.update(torch.ones(1, 4, 3), edge)
    out = {k: v.item() for k, v in m.compute().items()}
    assert out == {"boundary_rate_before_end/l1": 1.0, "boundary_rate_after_end/l1": 1.0,
                   "boundary_rate_before_end/l2": 1.0, "boundary_rate_after_end/l2": 1.0}
    assert (m.n_before.item(), m.n_after.item()) == (1.0, 1.0)
