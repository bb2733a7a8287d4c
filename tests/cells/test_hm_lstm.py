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


# -- ablation options: norm placement and the recurrent term on FLUSH ---------------------------------
def make_option_cell(**options):
    cell = HMLSTMCell(D, H, A, options.pop("layer_norm", True), **options)
    with torch.no_grad():
        for p in cell.parameters():
            p.normal_()
    return cell


def test_summed_norm_by_hand():
    cell = make_option_cell(norm_placement="summed")
    assert cell.norm_bottom_up is None and isinstance(cell.norm_cell, torch.nn.Identity)
    state = random_state(B, H, z=0)
    x = torch.randn(B, D)
    out = cell(x, z(1), state, torch.randn(B, A))
    summed = state.h @ cell.recurrent.weight.T + x @ cell.bottom_up.weight.T  # z_prev = 0: no top-down
    s = torch.nn.functional.layer_norm(summed, (4 * H + 1,), cell.norm_summed.weight, cell.norm_summed.bias) + cell.bias
    f, i, o = (torch.sigmoid(s[:, k * H : (k + 1) * H]) for k in range(3))
    c = f * state.c + i * torch.tanh(s[:, 3 * H : 4 * H])
    torch.testing.assert_close(out.c, c, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.h, o * torch.tanh(c), rtol=1e-5, atol=1e-6)  # the cell is not normalised
    torch.testing.assert_close(out.boundary_logit, s[:, -1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layer_norm", [False, True])
def test_flush_without_recurrent_term_ignores_the_previous_h(layer_norm):
    cell = make_option_cell(layer_norm=layer_norm, flush_recurrent=False)
    state = random_state(B, H, z=1)  # z_prev = 1: FLUSH
    x, above = torch.randn(B, D), torch.randn(B, A)
    a = cell(x, z(1), state, above)
    b = cell(x, z(1), state._replace(h=torch.randn(B, H)), above)
    assert torch.equal(a.h, b.h) and torch.equal(a.c, b.c) and torch.equal(a.boundary_logit, b.boundary_logit)
    # on UPDATE the term is there as before
    update = state._replace(z=z(0))
    assert not torch.allclose(cell(x, z(1), update, above).h, cell(x, z(1), update._replace(h=torch.randn(B, H)), above).h)


def test_default_options_are_todays_cell():
    torch.manual_seed(3)
    today = make_option_cell()
    torch.manual_seed(3)
    explicit = make_option_cell(norm_placement="bottom_up_and_cell", flush_recurrent=True)
    state, x, above = random_state(B, H, z=1), torch.randn(B, D), torch.randn(B, A)
    assert torch.equal(today(x, z(1), state, above).h, explicit(x, z(1), state, above).h)
    assert "norm_placement" not in repr(today) and "flush_recurrent=False" in repr(make_option_cell(flush_recurrent=False))


def test_option_errors():
    with pytest.raises(ValueError, match="norm_placement must be one of"):
        HMLSTMCell(D, H, A, True, norm_placement="everywhere")
    with pytest.raises(ValueError, match="needs layer_norm=true"):
        HMLSTMCell(D, H, A, False, norm_placement="summed")
