"""Mixture density head for pen offsets (Graves 2013, eqs. 18-26) on the gated output module."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hmrnn_lightning.heads.base import Head
from hmrnn_lightning.heads.output_module import GatedOutputModule


class Mixture(NamedTuple):
    """Parameters of the predicted distribution, each ``[..., M]`` except ``eos_logit [...]``."""

    eos_logit: Tensor  # end-of-stroke probability e = sigm(eos_logit)
    log_pi: Tensor  # log mixture weights
    mu_x: Tensor
    mu_y: Tensor
    log_sigma_x: Tensor
    log_sigma_y: Tensor
    rho: Tensor  # correlation in (-1, 1)


def bivariate_normal_log_density(x: Tensor, y: Tensor, m: Mixture) -> Tensor:
    """``log N(x, y | mu, sigma, rho)`` per component; ``x, y`` broadcast against ``[..., M]``."""
    one_minus_rho2 = 1.0 - m.rho**2
    zx = (x - m.mu_x) * torch.exp(-m.log_sigma_x)
    zy = (y - m.mu_y) * torch.exp(-m.log_sigma_y)
    z = zx**2 + zy**2 - 2.0 * m.rho * zx * zy
    return (
        -math.log(2.0 * math.pi) - m.log_sigma_x - m.log_sigma_y - 0.5 * torch.log(one_minus_rho2)
        - z / (2.0 * one_minus_rho2)
    )


class MixtureDensityHead(Head):
    """``M`` bivariate Gaussians for ``(dx, dy)`` and a Bernoulli for the pen (Graves 2013).

    Output layer: ``1 + 6M`` numbers per step: end-of-stroke logit, mixture logits, means,
    log standard deviations, and correlations ``rho = tanh(.)`` clamped to ``|rho| <= rho_max``
    so ``log(1 - rho^2)`` stays finite. The likelihood is computed in fp32 with log-sum-exp.

    Args:
        layer_sizes: hidden size of each stack layer (filled in by the model).
        num_components: mixture components ``M`` (Graves uses 20).
        embed_dim: output embedding size of the gated output module.
        rho_max: clamp of the correlation.
    """

    def __init__(self, layer_sizes: list[int], num_components: int = 20, embed_dim: int = 400, rho_max: float = 0.999) -> None:
        super().__init__()
        if num_components <= 0:
            raise ValueError(f"MixtureDensityHead: num_components must be positive, got {num_components}")
        self.M = num_components
        self.rho_max = rho_max
        self.output_module = GatedOutputModule(layer_sizes, embed_dim)
        self.params = nn.Linear(embed_dim, 1 + 6 * num_components)

    def forward(self, hidden: list[Tensor]) -> Tensor:
        return self.params(self.output_module(hidden))

    def readout(self, embedding: Tensor) -> Tensor:
        return self.params(embedding)

    def mixture(self, out: Tensor, bias: float = 0.0) -> Mixture:
        """Split raw outputs into parameters; ``bias`` > 0 sharpens (Graves 2013, section 5.4)."""
        out = out.float()
        M = self.M
        pi_logits = out[..., 1 : 1 + M] * (1.0 + bias)
        mu_x, mu_y, ls_x, ls_y, rho = out[..., 1 + M :].split(M, dim=-1)
        return Mixture(
            eos_logit=out[..., 0],
            log_pi=F.log_softmax(pi_logits, dim=-1),
            mu_x=mu_x, mu_y=mu_y,
            log_sigma_x=ls_x - bias, log_sigma_y=ls_y - bias,
            rho=torch.tanh(rho).clamp(-self.rho_max, self.rho_max),
        )

    def log_likelihood(self, out: Tensor, target: Tensor) -> Tensor:
        """``log p(dx, dy, pen)`` per step, ``[batch, time]``; ``target [..., 3]``."""
        m = self.mixture(out)
        target = target.float()
        x, y, pen = target[..., 0:1], target[..., 1:2], target[..., 2]
        log_xy = torch.logsumexp(m.log_pi + bivariate_normal_log_density(x, y, m), dim=-1)
        log_pen = -F.binary_cross_entropy_with_logits(m.eos_logit, pen, reduction="none")
        return log_xy + log_pen

    def nll(self, out: Tensor, target: Tensor) -> Tensor:
        return -self.log_likelihood(out, target)

    @torch.no_grad()
    def sample(self, out: Tensor, bias: float = 0.0) -> Tensor:
        """One ``(dx, dy, pen)`` per row of ``out [batch, 1 + 6M]``."""
        m = self.mixture(out, bias)
        k = torch.multinomial(m.log_pi.exp(), 1)  # [batch, 1]
        pick = lambda t: t.gather(-1, k).squeeze(-1)  # noqa: E731
        mx, my, sx, sy, r = pick(m.mu_x), pick(m.mu_y), pick(m.log_sigma_x).exp(), pick(m.log_sigma_y).exp(), pick(m.rho)
        n1, n2 = torch.randn_like(mx), torch.randn_like(mx)
        dx = mx + sx * n1
        dy = my + sy * (r * n1 + torch.sqrt(1.0 - r**2) * n2)
        pen = torch.bernoulli(torch.sigmoid(m.eos_logit))
        return torch.stack([dx, dy, pen], dim=-1)
