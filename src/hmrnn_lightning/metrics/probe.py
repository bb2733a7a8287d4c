"""A linear probe for word boundaries in a model's hidden states.

"The HM-LSTM learns word boundaries" means more when set against what a plain LSTM already
encodes: a logistic regression on the frozen ``h^l_t`` of each layer, fitted to predict
"this symbol ends a word" on validation text and scored on test text with the same
:class:`~hmrnn_lightning.metrics.BoundaryF1` as the HM-LSTM's ``z``.

Choices the measurement leaves open, made here:

* the labels are the datamodule's own (those the HM-LSTM's boundary F1 uses), so both are
  scored against the same positions;
* features are standardised with the fitting set's mean and deviation; the regression has
  a small L2 penalty (``1e-4``) and is solved full-batch with L-BFGS;
* the decision threshold is the one that maximises F1 on the fitting set (the classes are
  unbalanced, so 0.5 would understate what the states encode), never tuned on test text;
* at most ``max_fit`` validation positions are used to fit, drawn uniformly at random.

Where words are separated by a symbol (a space, PTB's ``_``), "this symbol ends a word" is
a function of the current input, which every hidden state sees, so a probe near 1.0 is
expected there; it tells most on text without separators (``SyntheticDataModule(spaces=False)``,
or any text datamodule with ``remove_separators``; ``hmrnn word-ends`` probes both models there).
Hence a second probe per layer, fitted the same way, reads ``h_t`` to predict whether the
*next* symbol ends a word: on text with separators that is whether the state knows a word
is complete before the separator arrives, which the input cannot give away.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import Tensor

from hmrnn_lightning.metrics.boundary_f1 import BoundaryF1


@dataclass
class LogisticProbe:
    """A fitted probe for one layer: ``p = sigmoid(((h - mean) / std) @ weight + bias)``."""

    mean: Tensor
    std: Tensor
    weight: Tensor
    bias: Tensor
    threshold: float

    def predict(self, h: Tensor) -> Tensor:
        """0/1 predictions for features ``[..., dim]``."""
        z = ((h.float() - self.mean) / self.std) @ self.weight + self.bias
        return (torch.sigmoid(z) > self.threshold).float()


def fit_logistic(x: Tensor, y: Tensor, l2: float = 1e-4, iterations: int = 100) -> LogisticProbe:
    """Logistic regression of 0/1 labels ``y [N]`` on features ``x [N, dim]`` (see the module)."""
    x = x.float()
    y = y.float()
    mean = x.mean(0)
    std = x.std(0).clamp_min(1e-6)
    xs = (x - mean) / std
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xs @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        p = torch.sigmoid(xs @ w + b)
    return LogisticProbe(mean, std, w.detach(), b.detach(), best_threshold(p, y))


def best_threshold(p: Tensor, y: Tensor) -> float:
    """The probability threshold with the highest F1 of ``p > t`` against ``y``."""
    order = torch.argsort(p, descending=True)
    hits = torch.cumsum(y[order], 0)
    k = torch.arange(1, len(p) + 1, dtype=torch.float32)
    f1 = 2 * hits / (k + y.sum()).clamp_min(1)
    best = int(torch.argmax(f1))
    # halfway to the next score, so ``p > t`` selects exactly the top best+1 positions
    nxt = p[order[best + 1]] if best + 1 < len(p) else p[order[best]] - 1e-6
    return float((p[order[best]] + nxt) / 2)


@torch.no_grad()
def _states(model, batches: Iterable, level: int):
    """``(hidden per layer [B, T, H], word labels [B, T])`` of each window, carrying the state
    across windows as training and evaluation do."""
    from hmrnn_lightning.cells.stack import detach_state

    state = None
    device = next(model.parameters()).device
    for inputs, _targets, labels in batches:
        inputs = inputs.to(device)
        if state is not None and state[0].h.shape[0] != inputs.shape[0]:
            state = None
        _, out = model(inputs, state)
        state = detach_state(out.state)
        yield [h.float().cpu() for h in out.hidden], labels[..., level].cpu()


def probe_word_boundaries(model, fit_batches: Iterable, test_batches: Iterable, level: int = 0,
                          max_fit: int = 40_000, tolerances: tuple[int, ...] = (0, 1), ahead: tuple[int, ...] = (0, 1),
                          seed: int = 0) -> dict[str, float]:
    """Fit probes on ``fit_batches`` and score them on ``test_batches``: for every layer and
    every offset ``a`` in ``ahead``, a probe reading ``h_t`` to predict the word-end label of
    step ``t + a``. ``a = 0`` is "this symbol ends a word"; ``a = 1`` asks whether the state
    already knows that the *next* symbol ends the word, which a separator in the input cannot
    give away (see the module docstring).

    Args:
        model: a language model whose ``forward`` returns ``(logits, StackOutput)``.
        fit_batches, test_batches: windows ``(inputs, targets, labels)`` in stream order
            (a validation and a test dataloader).
        level: which column of ``labels`` holds word ends.
        max_fit: most positions used to fit each probe.
        tolerances: F1 tolerances to report.
        ahead: label offsets to probe for.
        seed: draws the fitting positions.

    Returns:
        ``probe_f1/l{k}_word`` (offset 0, exact), ``probe_f1_tol{t}/l{k}_word``, and for an
        offset ``a > 0`` the same names with ``probe_ahead{a}_f1``; plus the thresholds,
        ``probe_threshold/l{k}`` and ``probe_ahead{a}_threshold/l{k}``.
    """
    was_training = model.training
    model.eval()
    try:
        feats: dict[int, list[list[Tensor]]] = {a: [] for a in ahead}
        labels: dict[int, list[Tensor]] = {a: [] for a in ahead}
        gen = torch.Generator().manual_seed(seed)
        windows = len(fit_batches) if hasattr(fit_batches, "__len__") else None
        for hidden, lab in _states(model, fit_batches, level):
            # keep a random share of each window, so a large split never sits in memory whole
            share = 1.0 if windows is None else min(1.0, 1.2 * max_fit / (windows * lab.numel()))
            for a in ahead:
                T = lab.shape[1] - a
                if T <= 0:
                    continue
                keep = torch.rand(lab.shape[0] * T, generator=gen) < share
                if not feats[a]:
                    feats[a] = [[] for _ in hidden]
                for l, h in enumerate(hidden):
                    feats[a][l].append(h[:, :T].reshape(-1, h.shape[-1])[keep])
                labels[a].append(lab[:, a:].reshape(-1)[keep])
        probes: dict[int, list[LogisticProbe]] = {}
        for a in ahead:
            if not feats[a]:
                raise ValueError("probe_word_boundaries: no windows to fit on")
            y = torch.cat(labels[a]).float()
            keep = torch.randperm(len(y), generator=gen)[:max_fit]
            probes[a] = [fit_logistic(torch.cat(f)[keep], y[keep]) for f in feats[a]]
        del feats, labels
        metrics = {(a, t): BoundaryF1(len(probes[a]), ["word"], t) for a in ahead for t in tolerances}
        for hidden, lab in _states(model, test_batches, level):
            for a in ahead:
                T = lab.shape[1] - a
                if T <= 0:
                    continue
                pred = torch.stack([p.predict(h[:, :T]) for p, h in zip(probes[a], hidden)], -1)
                for t in tolerances:
                    metrics[(a, t)].update(pred, lab[:, a:].unsqueeze(-1))
    finally:
        model.train(was_training)
    out: dict[str, float] = {}
    for (a, t), metric in metrics.items():
        name = "probe" if a == 0 else f"probe_ahead{a}"
        suffix = "" if t == 0 else f"_tol{t}"
        for key, value in metric.compute().items():
            if key.startswith("boundary_f1/"):
                out[f"{name}_f1{suffix}/" + key.split("/", 1)[1]] = float(value)
    for a in ahead:
        name = "probe" if a == 0 else f"probe_ahead{a}"
        for l, p in enumerate(probes[a]):
            out[f"{name}_threshold/l{l + 1}"] = p.threshold
    return out
