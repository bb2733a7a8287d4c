"""HM-LSTM layer against eqs. 2-7 with boundaries set by hand."""

import pytest
import torch

from hmrnn_lightning.cells import HMLSTMCell
from tests.helpers import random_state

B, D, H, A = 5, 6, 7, 4


def make_cell(layer_norm=False, above=A):
    cell = HMLSTMCell(D, H, above, layer_norm)
    with torch.no_grad():
        for p in cell.parameters():
            p.normal_()  # non-trivial biases and norm gains too
    return cell


def z(value):
    return torch.full((B,), float(value))


@pytest.mark.parametrize("layer_norm", [False, True])
def test_copy_carries_state_bit_exactly(layer_norm):
    cell = make_cell(layer_norm)
    state = random_state(B, H, z=0)
    out = cell(torch.randn(B, D), z(0), state, torch.randn(B, A))
    assert torch.equal(out.c, state.c)
    assert torch.equal(out.h, state.h)
    assert out.ops.copy.eq(1).all() and out.ops.update.eq(0).all() and out.ops.flush.eq(0).all()


@pytest.mark.parametrize("layer_norm", [False, True])
@pytest.mark.parametrize("z_below", [0, 1])
def test_flush_forgets_the_cell(layer_norm, z_below):
    cell = make_cell(layer_norm)
    state = random_state(B, H, z=1)
    other = state._replace(c=torch.randn(B, H) * 10)
    x, above = torch.randn(B, D), torch.randn(B, A)
    a = cell(x, z(z_below), state, above)
    b = cell(x, z(z_below), other, above)
    assert torch.equal(a.c, b.c) and torch.equal(a.h, b.h)
    # but the recurrent term U h_{t-1} still enters (eq. 5 has no gate)
    c = cell(x, z(z_below), state._replace(h=torch.randn(B, H)), above)
    assert not torch.allclose(a.h, c.h)


def test_update_is_an_lstm_step_by_hand():
    cell = make_cell()
    state = random_state(B, H, z=0)
    x = torch.randn(B, D)
    out = cell(x, z(1), state, torch.randn(B, A))
    s = state.h @ cell.recurrent.weight.T + x @ cell.bottom_up.weight.T + cell.bias  # no top-down: z_prev = 0
    f, i, o = (torch.sigmoid(s[:, k * H : (k + 1) * H]) for k in range(3))
    g = torch.tanh(s[:, 3 * H : 4 * H])
    c = f * state.c + i * g
    torch.testing.assert_close(out.c, c, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.h, o * torch.tanh(c), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.boundary_logit, s[:, -1], rtol=1e-5, atol=1e-6)


def test_flush_by_hand_includes_top_down():
    cell = make_cell()
    state = random_state(B, H, z=1)
    x, above = torch.randn(B, D), torch.randn(B, A)
    out = cell(x, z(1), state, above)
    s = state.h @ cell.recurrent.weight.T + above @ cell.top_down.weight.T + x @ cell.bottom_up.weight.T + cell.bias
    i, o = torch.sigmoid(s[:, H : 2 * H]), torch.sigmoid(s[:, 2 * H : 3 * H])
    c = i * torch.tanh(s[:, 3 * H : 4 * H])
    torch.testing.assert_close(out.c, c, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.h, o * torch.tanh(c), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layer_norm", [False, True])
def test_top_down_only_after_own_boundary(layer_norm):
    cell = make_cell(layer_norm)
    x = torch.randn(B, D)
    for z_prev, should_matter in ((0, False), (1, True)):
        state = random_state(B, H, z=z_prev)
        a = cell(x, z(1), state, torch.randn(B, A))
        b = cell(x, z(1), state, torch.randn(B, A))
        assert torch.equal(a.h, b.h) != should_matter


@pytest.mark.parametrize("layer_norm", [False, True])
def test_bottom_up_only_after_boundary_below(layer_norm):
    cell = make_cell(layer_norm)
    state = random_state(B, H, z=1)  # FLUSH, so the step is computed whatever z_below is
    above = torch.randn(B, A)
    for z_below, should_matter in ((0, False), (1, True)):
        a = cell(torch.randn(B, D), z(z_below), state, above)
        b = cell(torch.randn(B, D), z(z_below), state, above)
        assert torch.equal(a.h, b.h) != should_matter


def test_top_layer_has_no_top_down():
    cell = HMLSTMCell(D, H, None)
    assert cell.top_down is None
    out = cell(torch.randn(B, D), z(1), random_state(B, H, z=1), None)
    assert out.h.shape == (B, H)


def test_layer_norm_update_by_hand():
    cell = make_cell(layer_norm=True)
    state = random_state(B, H, z=0)
    x = torch.randn(B, D)
    out = cell(x, z(1), state, torch.randn(B, A))
    # layer norm on the bottom-up term and the cell only (HMCell says why)
    assert cell.norm_recurrent is None and cell.norm_top_down is None
    s = state.h @ cell.recurrent.weight.T + cell.norm_bottom_up(x @ cell.bottom_up.weight.T) + cell.bias
    f, i, o = (torch.sigmoid(s[:, k * H : (k + 1) * H]) for k in range(3))
    c = f * state.c + i * torch.tanh(s[:, 3 * H : 4 * H])
    torch.testing.assert_close(out.c, c, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.h, o * torch.tanh(cell.norm_cell(c)), rtol=1e-5, atol=1e-6)


def test_rejects_bad_sizes():
    with pytest.raises(ValueError, match="hidden_size"):
        HMLSTMCell(4, 0, None)
