"""The linear word-boundary probe: finds a linearly encoded label, not a random one."""

from __future__ import annotations

import torch

from hmrnn_lightning.metrics.probe import best_threshold, fit_logistic, probe_word_boundaries


def test_logistic_probe_recovers_a_linear_label():
    x = torch.randn(4000, 6)
    y = (x[:, 2] - 0.5 * x[:, 4] > 0.8).float()
    probe = fit_logistic(x, y)
    pred = probe.predict(x)
    assert (pred == y).float().mean() > 0.97
    assert (probe.predict(torch.randn(4000, 6)) == 0).float().mean() > 0.5  # not "always a boundary"


def test_best_threshold_maximises_f1():
    p = torch.tensor([0.9, 0.8, 0.7, 0.2, 0.1])
    y = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0])
    t = best_threshold(p, y)
    # top-2 gives F1 0.8, top-4 gives F1 6/7: the best keeps the four highest
    assert 0.1 < t < 0.2


class _Echo(torch.nn.Module):
    """A stand-in model whose single layer's state is a noisy copy of the label (layer 1) and pure
    noise (layer 2); the probe must find the first and not the second."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, inputs, state=None):
        from types import SimpleNamespace

        from hmrnn_lightning.cells.base import LayerState

        lab = (inputs % 5 == 0).float().unsqueeze(-1)
        h1 = torch.cat([lab + 0.1 * torch.randn_like(lab), torch.randn_like(lab)], -1)
        h2 = torch.randn(*inputs.shape, 2)
        B = inputs.shape[0]
        st = [LayerState(torch.zeros(B, 2), torch.zeros(B, 2), torch.zeros(B))]
        return None, SimpleNamespace(hidden=[h1, h2], state=st)


def _windows(n, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(0, 20, (4, 25), generator=g)
        out.append((x, x, (x % 5 == 0).long().unsqueeze(-1)))
    return out


def test_probe_scores_each_layer_on_test_text():
    res = probe_word_boundaries(_Echo(), _windows(20, 0), _windows(10, 1), level=0, max_fit=1500)
    assert res["probe_f1/l1_word"] > 0.95
    assert res["probe_f1/l2_word"] < 0.6
    assert res["probe_f1_tol1/l1_word"] >= res["probe_f1/l1_word"] - 1e-6
