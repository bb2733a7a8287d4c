"""HM-RNN layer: the three operations on a tanh RNN."""

import torch

from hmrnn_lightning.cells import HMRNNCell
from tests.helpers import random_state

B, D, H, A = 4, 5, 6, 3


def ones(v):
    return torch.full((B,), float(v))


def test_hm_rnn_operations():
    cell = HMRNNCell(D, H, A)
    with torch.no_grad():
        cell.bias.normal_()
    x, above = torch.randn(B, D), torch.randn(B, A)
    copy_state = random_state(B, H, z=0)
    out = cell(x, ones(0), copy_state, above)
    assert torch.equal(out.h, copy_state.h)

    upd = cell(x, ones(1), copy_state, above)
    expected = torch.tanh(copy_state.h @ cell.recurrent.weight.T + x @ cell.bottom_up.weight.T + cell.bias)[:, :H]
    torch.testing.assert_close(upd.h, expected, rtol=1e-5, atol=1e-6)

    flush_state = random_state(B, H, z=1)
    a = cell(x, ones(1), flush_state, above)
    b = cell(x, ones(1), flush_state._replace(h=torch.randn(B, H)), above)
    assert torch.equal(a.h, b.h)  # FLUSH drops the recurrent term entirely
    expected = torch.tanh(above @ cell.top_down.weight.T + x @ cell.bottom_up.weight.T + cell.bias)[:, :H]
    torch.testing.assert_close(a.h, expected, rtol=1e-5, atol=1e-6)
