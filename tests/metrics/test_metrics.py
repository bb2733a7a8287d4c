import math

import torch

from hmrnn_lightning.metrics import BitsPerCharacter, BoundaryStatistics


def test_bpc_equals_hand_computation():
    probs = [0.5, 0.25, 0.125, 0.9]
    nll = -torch.log(torch.tensor(probs))
    m = BitsPerCharacter()
    m.update(nll[:2])
    m.update(nll[2:].view(1, 2))
    expected = sum(-math.log2(p) for p in probs) / 4  # (1 + 2 + 3 + 0.152) / 4
    assert abs(m.compute().item() - expected) < 1e-6


def test_bpc_mask():
    m = BitsPerCharacter()
    m.update(torch.tensor([math.log(2.0), 100.0]), mask=torch.tensor([1, 0]))
    assert abs(m.compute().item() - 1.0) < 1e-6


def test_boundary_statistics():
    z = torch.tensor([[[1.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 0.0]]])  # [1, 4, 2]
    ops = torch.zeros(1, 4, 2, 3)
    ops[0, :, 0, 0] = 1  # layer 1 always UPDATE
    ops[0, [0, 2], 1, 0] = 1  # layer 2 UPDATE twice
    ops[0, [1, 3], 1, 1] = 1  # COPY twice
    m = BoundaryStatistics(2)
    m.update(z, ops)
    out = m.compute()
    assert out["boundary_rate/l1"].item() == 0.5
    assert out["update_frac/l2"].item() == 0.5 and out["copy_frac/l2"].item() == 0.5
    assert out["flush_frac/l2"].item() == 0.0


def test_separator_rates_tell_a_word_detector_from_its_reverse():
    from hmrnn_lightning.metrics import SeparatorRates

    inputs = torch.tensor([[0, 1, 2, 0, 1, 2, 2, 1]])  # symbol 2 is the separator
    sep = (inputs == 2).float()
    z = torch.stack([sep, 1 - sep, torch.zeros_like(sep)], -1)  # l1 fires on separators, l2 on all else, l3 (top) never
    m = SeparatorRates(2, separator_ids=[2])
    m.update(z, inputs)
    out = {k: float(v) for k, v in m.compute().items()}
    assert out == {"boundary_rate_sep/l1": 1.0, "boundary_rate_other/l1": 0.0,
                   "boundary_rate_sep/l2": 0.0, "boundary_rate_other/l2": 1.0}
    m.reset()
    m.update(z, torch.zeros_like(inputs))  # no separator in the text: no rate on separators to report
    assert set(m.compute()) == {"boundary_rate_other/l1", "boundary_rate_other/l2"}
