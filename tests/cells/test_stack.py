"""The reference time loop: forced boundaries, state carrying, errors."""

import pytest
import torch

from hmrnn_lightning import HMStack, LSTMStack, SoftEstimator, StepEstimator
from hmrnn_lightning.cells import COPY, FLUSH, UPDATE
from hmrnn_lightning.registry import RegistryError

B, T, D = 3, 12, 5


@pytest.fixture(params=["reference", "sequence"], autouse=True)
def impl(request, monkeypatch):
    """Every test here runs on both implementations."""
    monkeypatch.setattr("tests.cells.test_stack.IMPL", request.param)
    return request.param


IMPL = "reference"


def stack(**kw):
    kw.setdefault("estimator", StepEstimator())
    kw.setdefault("impl", IMPL if kw.get("cell", "hm_lstm") == "hm_lstm" else "reference")
    return HMStack(D, [8, 7, 6], **kw)


def test_shapes_and_top_layer_has_no_boundary():
    out = stack()(torch.randn(B, T, D))
    assert [h.shape for h in out.hidden] == [(B, T, 8), (B, T, 7), (B, T, 6)]
    assert out.boundaries.shape == (B, T, 3) and out.boundary_logits.shape == (B, T, 2)
    assert out.boundaries[..., -1].eq(0).all()
    assert set(out.boundaries.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(out.operations.sum(-1), torch.ones(B, T, 3))


def test_forced_boundaries_drive_the_operations():
    s = stack()
    forced = torch.zeros(B, T, 2)
    forced[:, 3, 0] = 1  # layer 1 ends a segment at t=3
    forced[:, 7, 0] = 1
    forced[:, 7, 1] = 1  # layer 2 ends one at t=7
    out = s(torch.randn(B, T, D), boundaries=forced)
    ops = out.operations.argmax(-1)
    # layer 1: z^0 = 1 always, so it UPDATEs except right after its own boundary
    assert ops[0, :, 0].tolist() == [UPDATE] * 4 + [FLUSH] + [UPDATE] * 3 + [FLUSH] + [UPDATE] * 3
    # layer 2: UPDATE when layer 1 fired, FLUSH after its own boundary, COPY otherwise
    assert ops[0, :, 1].tolist() == [COPY] * 3 + [UPDATE] + [COPY] * 3 + [UPDATE] + [FLUSH] + [COPY] * 3
    # layer 3 (top) UPDATEs exactly when layer 2 fired
    assert ops[0, :, 2].tolist() == [COPY] * 7 + [UPDATE] + [COPY] * 4
    h2 = out.hidden[1]
    for t in [1, 2, 4, 5, 6, 9, 10, 11]:  # COPY steps of layer 2: bit-identical state
        assert torch.equal(h2[:, t], h2[:, t - 1])
    assert not torch.equal(h2[:, 3], h2[:, 2])


def test_copy_keeps_z_even_if_forced():
    forced = torch.zeros(B, T, 2)
    forced[:, 5, 1] = 1  # layer 2 is in COPY at t=5 (layer 1 silent), so this is ignored
    out = stack()(torch.randn(B, T, D), boundaries=forced)
    assert out.boundaries[:, 5, 1].eq(0).all()


@pytest.mark.parametrize("cell", ["hm_lstm", "hm_rnn"])
@pytest.mark.parametrize("layer_norm", [False, True])
def test_two_halves_equal_one_pass(cell, layer_norm):
    s = stack(cell=cell, layer_norm=layer_norm)
    x = torch.randn(B, T, D)
    whole = s(x)
    first = s(x[:, : T // 2])
    second = s(x[:, T // 2 :], first.state)
    for l in range(3):
        joined = torch.cat([first.hidden[l], second.hidden[l]], 1)
        torch.testing.assert_close(joined, whole.hidden[l], rtol=0, atol=0)
    assert torch.equal(torch.cat([first.boundaries, second.boundaries], 1), whole.boundaries)


def test_soft_estimator_mixes_operations():
    out = stack(estimator=SoftEstimator())(torch.randn(B, T, D))
    z = out.boundaries[..., :2]
    assert ((z > 0) & (z < 1)).any()
    torch.testing.assert_close(out.operations.sum(-1), torch.ones(B, T, 3))


def test_errors_name_the_problem():
    s = stack()
    with pytest.raises(ValueError, match="shape"):
        s(torch.randn(B, D))
    with pytest.raises(ValueError, match="features"):
        s(torch.randn(B, T, D + 1))
    state = s(torch.randn(B, T, D)).state
    with pytest.raises(ValueError, match="another batch size"):
        s(torch.randn(B + 1, T, D), state)
    with pytest.raises(ValueError, match="boundaries must have shape"):
        s(torch.randn(B, T, D), boundaries=torch.zeros(B, T, 3))
    with pytest.raises(RegistryError, match="known cells: hm_lstm, hm_rnn"):
        stack(cell="hm_gru")
    with pytest.raises(TypeError, match="BoundaryEstimator"):
        HMStack(D, [4], estimator="step")
    with pytest.raises(ValueError, match="hidden_sizes"):
        HMStack(D, [], estimator=StepEstimator())


@pytest.mark.parametrize("layer_norm", [False, True])
def test_lstm_stack_interface(layer_norm):
    s = LSTMStack(D, [8, 6], layer_norm=layer_norm)
    x = torch.randn(B, T, D)
    whole = s(x)
    assert [h.shape for h in whole.hidden] == [(B, T, 8), (B, T, 6)]
    assert whole.boundaries.eq(0).all() and whole.operations[..., UPDATE].eq(1).all()
    first = s(x[:, :5])
    second = s(x[:, 5:], first.state)
    torch.testing.assert_close(torch.cat([first.hidden[1], second.hidden[1]], 1), whole.hidden[1], rtol=1e-5, atol=1e-6)


def test_bf16_autocast_keeps_state_fp32():
    s = stack(layer_norm=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = s(torch.randn(B, T, D))
    assert all(h.dtype == torch.float32 for h in out.hidden)
    assert out.state[0].c.dtype == torch.float32
    assert set(out.boundaries.unique().tolist()) <= {0.0, 1.0}


def test_configs_and_checkpoints_from_before_the_triton_path_still_load(monkeypatch):
    """Every config and checkpoint written before 0.2.0 holds ``compile: false`` in the stack's
    init_args (LightningCLI writes the defaults out); the argument is accepted and ignored."""
    import warnings

    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--stack", type=HMStack)
    cfg = parser.parse_object({"stack": {"class_path": "hmrnn_lightning.cells.HMStack", "init_args": {
        "input_size": 4, "hidden_sizes": [5, 5], "estimator": {"class_path": "hmrnn_lightning.estimators.StepEstimator"},
        "impl": "auto", "compile": False}}})
    stack_ = parser.instantiate_classes(cfg).stack
    assert stack_.active_impl() == "sequence"
    monkeypatch.setattr("hmrnn_lightning.cells.stack._WARNED", set())  # the warning is given once per process
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        HMStack(4, [5, 5], StepEstimator(), compile=True)
    assert any("compile=True is retired" in str(w.message) for w in caught)


# -- ablation options of the HM-LSTM cell: the reference loop runs them ---------------------------------
def cell_loop(s, x):
    """The stack's cells stepped by hand (the reference loop's rules, written again)."""
    from hmrnn_lightning.cells.base import LayerState
    from hmrnn_lightning.cells.operations import keep_if_copy

    state = s.initial_state(x.shape[0])
    hidden, zs = [[] for _ in s.cells], []
    for t in range(x.shape[1]):
        h_below, z_below, new, step_z = x[:, t], torch.ones(x.shape[0]), [], []
        for l, cell in enumerate(s.cells):
            above = state[l + 1].h if l + 1 < len(s.cells) else None
            step = cell(h_below, z_below, state[l], above)
            z = torch.zeros(x.shape[0])
            if l + 1 < len(s.cells):
                z = keep_if_copy(step.ops, state[l].z.unsqueeze(-1), s.estimator(step.boundary_logit).unsqueeze(-1)).squeeze(-1)
            new.append(LayerState(step.h, step.c, z))
            hidden[l].append(step.h)
            step_z.append(z)
            h_below, z_below = step.h, z
        state = new
        zs.append(torch.stack(step_z, -1))
    return [torch.stack(h, 1) for h in hidden], torch.stack(zs, 1)


@pytest.mark.parametrize("options", [{"norm_placement": "summed"}, {"flush_recurrent": False},
                                     {"norm_placement": "summed", "flush_recurrent": False}])
def test_cell_options_run_on_the_reference_loop(options):
    s = HMStack(D, [8, 7, 6], estimator=StepEstimator(), layer_norm=True, impl="auto", **options)
    assert s.active_impl("cpu") == "reference"
    from hmrnn_lightning.engine.sequence import SequenceBackend
    from hmrnn_lightning.engine.triton_window import TritonBackend

    assert SequenceBackend().why_not(s) is not None and TritonBackend().why_not(s) is not None
    with pytest.raises(ValueError, match="impl='sequence' needs"):
        HMStack(D, [8, 7, 6], estimator=StepEstimator(), layer_norm=True, impl="sequence", **options)
    x = torch.randn(B, T, D)
    out = s(x)
    hidden, boundaries = cell_loop(s, x)
    assert torch.equal(out.boundaries, boundaries) and out.boundaries[..., 0].sum() > 0
    for a, b in zip(out.hidden, hidden):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    default = HMStack(D, [8, 7, 6], estimator=StepEstimator(), layer_norm=True, impl="auto")
    default.load_state_dict(s.state_dict(), strict=False)
    assert default.active_impl("cpu") == "sequence"
    assert not torch.allclose(default(x).hidden[0], out.hidden[0])  # the option changes the computation


@pytest.mark.parametrize("cell", ["hm_lstm", "hm_rnn"])
def test_below_only_boundary_init_zeroes_the_boundary_rows_of_the_past_and_the_layer_above(cell):
    """``boundary_init="below_only"``: with the same seed every weight is as with ``uniform`` except
    the boundary unit's rows of the recurrent and top-down weights, which are 0; so at first the
    boundary logit does not depend on the layer's previous state, and those rows still learn."""
    torch.manual_seed(0)
    uniform = HMStack(D, [8, 7, 6], estimator=StepEstimator(), layer_norm=True, cell=cell, impl="reference")
    torch.manual_seed(0)
    below = HMStack(D, [8, 7, 6], estimator=StepEstimator(), layer_norm=True, cell=cell, impl="reference",
                    boundary_init="below_only")
    assert "boundary_init='below_only'" in repr(below.cells[0]) and "boundary_init" not in repr(uniform.cells[0])
    for u, b in zip(uniform.cells, below.cells):
        for name in ("recurrent", "top_down"):
            if getattr(u, name) is None:
                continue
            wu, wb = getattr(u, name).weight, getattr(b, name).weight
            assert (wb[-1] == 0).all() and (wu[-1] != 0).all() and torch.equal(wu[:-1], wb[:-1])
        assert torch.equal(u.bottom_up.weight, b.bottom_up.weight)
    x = torch.randn(B, T, D)
    out = below(x)
    (out.hidden[0].sum() + out.hidden[1].sum()).backward()
    assert below.cells[0].recurrent.weight.grad[-1].abs().sum() > 0  # the zero row learns
    with pytest.raises(ValueError, match="boundary_init must be one of uniform, below_only"):
        HMStack(D, [8, 7], estimator=StepEstimator(), cell=cell, boundary_init="zeros")


@pytest.mark.parametrize("cell", ["hm_lstm", "hm_rnn"])
def test_without_flush_gradient_z_prev_learns_only_through_the_carry_and_the_gate(cell):
    """``flush_gradient=False`` takes ``z^l_{t-1}`` as a constant in the operations' weights: the
    boundary logits' gradients change, the forward pass does not, and the fast paths still run it."""
    torch.manual_seed(0)
    full = HMStack(D, [8, 7, 6], estimator=StepEstimator(), layer_norm=True, cell=cell, impl="reference")
    cut = HMStack(D, [8, 7, 6], estimator=StepEstimator(), layer_norm=True, cell=cell, impl="reference", flush_gradient=False)
    cut.load_state_dict(full.state_dict())
    assert "flush_gradient=False" in repr(cut.cells[0])
    x = torch.randn(B, T, D)
    a, b = full(x), cut(x)
    assert torch.equal(a.boundaries, b.boundaries) and torch.equal(a.hidden[0], b.hidden[0])
    assert a.boundaries[..., 0].mean() > 0.1 and a.operations[:, 1:, 0, 2].sum() > 0  # layer 1 flushes at times
    grads = [torch.autograd.grad(o.hidden[0].sum() + o.hidden[1].sum(), s.cells[0].recurrent.weight)[0]
             for o, s in ((a, full), (b, cut))]
    assert not torch.allclose(grads[0][-1], grads[1][-1])  # the boundary row's gradient
    if cell == "hm_lstm":
        auto = HMStack(D, [8, 7, 6], estimator=StepEstimator(), layer_norm=True, impl="auto", flush_gradient=False)
        assert auto.active_impl("cpu") == "sequence"


def test_cell_options_refused_by_cells_without_them():
    with pytest.raises(ValueError, match=r"cell 'hm_rnn' \(HMRNNCell\) does not take flush_recurrent; leave it at the "
                                         r"default \(flush_recurrent: True\)"):
        HMStack(D, [8, 7, 6], estimator=StepEstimator(), cell="hm_rnn", flush_recurrent=False)
