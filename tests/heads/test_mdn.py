"""Mixture density head against scipy, and its sampler against the mixture's moments."""

import numpy as np
import torch
from scipy.stats import multivariate_normal

from hmrnn_lightning.heads import MixtureDensityHead


def make_head(M=3):
    torch.manual_seed(0)
    return MixtureDensityHead([4, 4], num_components=M, embed_dim=5)


def test_log_likelihood_equals_scipy():
    head = make_head()
    out = torch.randn(2, 4, 1 + 6 * 3)
    target = torch.randn(2, 4, 3)
    target[..., 2] = torch.tensor([[0, 1, 0, 1], [1, 0, 0, 0]], dtype=torch.float32)
    ll = head.log_likelihood(out, target)
    m = head.mixture(out)
    for b in range(2):
        for t in range(4):
            dens = 0.0
            for k in range(3):
                sx, sy, r = (float(v[b, t, k]) for v in (m.log_sigma_x.exp(), m.log_sigma_y.exp(), m.rho))
                cov = [[sx * sx, r * sx * sy], [r * sx * sy, sy * sy]]
                mean = [float(m.mu_x[b, t, k]), float(m.mu_y[b, t, k])]
                dens += float(m.log_pi[b, t, k].exp()) * multivariate_normal(mean, cov).pdf(target[b, t, :2].numpy())
            e = 1 / (1 + np.exp(-float(out[b, t, 0])))
            pen = float(target[b, t, 2])
            expected = np.log(dens) + (np.log(e) if pen else np.log(1 - e))
            assert abs(ll[b, t].item() - expected) < 1e-4, (b, t, ll[b, t].item(), expected)


def test_extreme_correlation_stays_finite():
    head = make_head(M=1)
    out = torch.zeros(1, 1, 7)
    out[..., 6] = 50.0  # tanh -> 1, clamped
    out[..., 4:6] = -8.0  # tiny sigma
    ll = head.log_likelihood(out, torch.tensor([[[3.0, -3.0, 1.0]]]))
    assert torch.isfinite(ll).all()


def test_sampling_reproduces_the_mixture_moments():
    torch.manual_seed(1)
    head = make_head(M=2)
    out = torch.zeros(1, 13)
    out[0, 0] = 0.5  # e = sigm(0.5)
    out[0, 1:3] = torch.tensor([0.0, np.log(3.0)])  # weights 1/4, 3/4
    out[0, 3:5] = torch.tensor([-1.0, 2.0])  # mu_x
    out[0, 5:7] = torch.tensor([0.5, -1.0])  # mu_y
    out[0, 7:9] = torch.log(torch.tensor([0.5, 1.0]))  # sigma_x
    out[0, 9:11] = torch.log(torch.tensor([1.0, 0.3]))  # sigma_y
    out[0, 11:13] = torch.atanh(torch.tensor([0.6, -0.4]))  # rho
    n = 60000
    s = head.sample(out.expand(n, 13)).numpy()
    w = np.array([0.25, 0.75])
    mx, my = np.array([-1.0, 2.0]), np.array([0.5, -1.0])
    sx, sy, r = np.array([0.5, 1.0]), np.array([1.0, 0.3]), np.array([0.6, -0.4])
    mean_x, mean_y = (w * mx).sum(), (w * my).sum()
    var_x = (w * (sx**2 + mx**2)).sum() - mean_x**2
    cov_xy = (w * (r * sx * sy + mx * my)).sum() - mean_x * mean_y
    assert abs(s[:, 0].mean() - mean_x) < 0.03 and abs(s[:, 1].mean() - mean_y) < 0.03
    assert abs(s[:, 0].var() - var_x) < 0.05
    assert abs(np.cov(s[:, 0], s[:, 1])[0, 1] - cov_xy) < 0.05
    assert abs(s[:, 2].mean() - 1 / (1 + np.exp(-0.5))) < 0.01
