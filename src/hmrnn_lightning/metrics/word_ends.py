"""Word ends found without spaces: an HM-LSTM's boundaries against an LSTM's surprisal peaks
and a linear probe on both, on text whose separators were removed (``remove_separators``).

The question (issue 21): does the HM-LSTM's best layer find word ends better than what an
unsupervised reading of a plain LSTM gives at the same firing rate? Three detectors are scored
against the same gold labels (each word's last symbol), with the same
:class:`~hmrnn_lightning.metrics.BoundaryF1`:

(a) the HM-LSTM's ``z^l_t`` of every layer with a detector;
(b) the LSTM's *surprisal peaks*: a boundary after ``x_t`` where the surprisal of the next
    symbol, ``-log p(x_{t+1} | x_{<=t})``, is a local peak (the first symbol of a word is the
    hard one to predict; Elman 1990, Feng et al. 2006), thresholded so that it fires on exactly
    as many positions as the HM layer it is set against (the top ``round(rate * N)`` peaks).
    ``entropy`` uses the entropy of ``p(. | x_{<=t})`` instead, which needs no look at
    ``x_{t+1}``; ``peaks_only=False`` ranks every position, not only local peaks;
(c) the same supervised linear probe (:mod:`hmrnn_lightning.metrics.probe`) on both models'
    hidden states, fitted on one text and scored on another.

Choices made here:

* a peak is ``s_t > s_{t-1}`` and ``s_t >= s_{t+1}`` (a plateau fires once, at its start);
  the last position, which has no next symbol, never fires;
* when fewer peaks exist than the rate asks for, every peak fires and the achieved rate is
  reported as it is (it is then below the HM layer's);
* the whole text is one stream, read in windows with the state carried (as evaluation
  does), so a pair of boundaries can never straddle two windows and be lost;
* the precision-recall curve of the baseline is its precision and recall at a grid of firing
  rates (``PR_RATES``) plus the HM layers' rates;
* surprisal looks one symbol ahead (it needs ``x_{t+1}``) where ``z^l_t`` sees only
  ``x_{<=t}``: without separators a causal detector can know that a word has ended only once
  the next word's first symbol is in. So each layer is also scored *one symbol later*: its
  ``z^l_{t+1}`` read as the boundary after ``x_t``, the same look-ahead surprisal has (rows
  ``hm_next`` and ``baseline_next``, the baseline at that reading's rate). ``entropy`` is the
  causal baseline to set against the plain ``z^l_t``;
* ``offsets`` gives, per layer, its firing rate on the symbols ``OFFSETS`` away from each word
  end (0: the word's last symbol, +1: the next word's first), which shows where a layer fires
  when the exact F1 is low.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hmrnn_lightning.metrics.boundary_f1 import BoundaryF1

#: firing rates at which the baseline's precision-recall curve is drawn
PR_RATES = tuple(round(0.05 * k, 2) for k in range(1, 13))
#: positions, relative to each word's last symbol, at which ``offset_rates`` counts firing
OFFSETS = (-2, -1, 0, 1, 2)
BASELINES = ("surprisal", "entropy")


@dataclass
class TextPass:
    """What one model gives on a text of ``N`` symbols read as one stream.

    Attributes:
        hidden: per layer, ``h^l_t`` ``[N, hidden_l]`` (empty unless asked for).
        boundaries: ``z^l_t`` ``[N, layers]`` (zeros for a stack without detectors).
        surprisal: ``-log p(x_{t+1} | x_{<=t})`` in nats ``[N]``; NaN at the last position.
        entropy: entropy of ``p(. | x_{<=t})`` in nats ``[N]``.
    """

    hidden: list[Tensor]
    boundaries: Tensor
    surprisal: Tensor
    entropy: Tensor


@torch.no_grad()
def read_text(model, ids: Tensor, window: int = 1000, keep_hidden: bool = False) -> TextPass:
    """Run ``model`` over symbol ids ``[N]`` in windows of ``window`` with the state carried;
    the hidden states are kept only with ``keep_hidden`` (``N x hidden`` floats per layer)."""
    if ids.dim() != 1 or ids.numel() < 2:
        raise ValueError(f"read_text: expected at least 2 symbol ids in a 1-d tensor, got shape {tuple(ids.shape)}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    state, hidden, zs, logps = None, [], [], []
    try:
        for begin in range(0, ids.numel(), window):
            chunk = ids[begin : begin + window].to(device).unsqueeze(0)
            logits, out = model(chunk, state)
            state = out.state
            if keep_hidden:
                hidden.append([h[0].float().cpu() for h in out.hidden])
            zs.append(out.boundaries[0].float().cpu())
            logps.append(torch.log_softmax(logits[0].float(), -1).cpu())
    finally:
        model.train(was_training)
    logp = torch.cat(logps)
    entropy = -(logp.exp() * logp).sum(-1)
    surprisal = torch.full((ids.numel(),), float("nan"))
    surprisal[:-1] = -logp[:-1].gather(1, ids[1:].long().unsqueeze(1)).squeeze(1)
    layers = [torch.cat([h[l] for h in hidden]) for l in range(len(hidden[0]))] if hidden else []
    return TextPass(layers, torch.cat(zs), surprisal, entropy)


def local_peaks(scores: Tensor) -> Tensor:
    """Boolean ``[N]``: ``s_t > s_{t-1}`` (or ``t = 0``) and ``s_t >= s_{t+1}`` (or ``t = N - 1``);
    NaN scores are never peaks."""
    s = torch.nan_to_num(scores.double(), nan=float("-inf"))
    left = torch.cat([s.new_full((1,), float("-inf")), s[:-1]])
    right = torch.cat([s[1:], s.new_full((1,), float("-inf"))])
    return (s > left) & (s >= right) & torch.isfinite(s)


def fire_at_rate(scores: Tensor, rate: float, peaks_only: bool = True) -> Tensor:
    """0/1 ``[N]``: the ``round(rate * N)`` highest-scoring positions (among local peaks with
    ``peaks_only``; NaN never fires); fewer when there are not enough candidates."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"fire_at_rate: rate must be from 0 to 1, got {rate}")
    candidates = local_peaks(scores) if peaks_only else ~torch.isnan(scores)
    s = torch.where(candidates, scores.double(), torch.tensor(float("-inf"), dtype=torch.float64))
    k = min(int(round(rate * scores.numel())), int(candidates.sum()))
    fired = torch.zeros(scores.numel())
    if k > 0:
        fired[torch.topk(s, k).indices] = 1.0  # ties at the threshold: topk picks k of them
    return fired


def score(pred: Tensor, labels: Tensor, tolerances: tuple[int, ...] = (0, 1)) -> list[dict[str, float]]:
    """Per column of ``pred [N, k]`` (0/1): firing rate, precision, recall and F1 against the
    0/1 ``labels [N]``, exact and (``f1_tol{t}``) within ``t`` steps."""
    pred = pred.reshape(pred.shape[0], -1).float()
    rows = [{"rate": float(pred[:, j].mean())} for j in range(pred.shape[1])]
    for tol in tolerances:
        metric = BoundaryF1(pred.shape[1], ["word"], tol)
        metric.update(pred.unsqueeze(0), labels.reshape(1, -1, 1).float())
        values = metric.compute()
        for j, row in enumerate(rows):
            suffix = "" if tol == 0 else f"_tol{tol}"
            for name in ("precision", "recall", "f1"):
                if tol == 0 or name == "f1":
                    row[f"{name}{suffix}"] = float(values[f"boundary_{name}/l{j + 1}_word"])
    return rows


def pr_curve(scores: Tensor, labels: Tensor, rates, peaks_only: bool = True) -> list[dict[str, float]]:
    """The baseline's rate, precision, recall and F1 (exact) at each firing rate of ``rates``."""
    preds = torch.stack([fire_at_rate(scores, r, peaks_only) for r in rates], -1)
    return [{"target_rate": float(r), **{k: v for k, v in row.items() if "tol" not in k}}
            for r, row in zip(rates, score(preds, labels, (0,)))]


def one_symbol_later(z: Tensor) -> Tensor:
    """``z [N, k]`` read one symbol later: row ``t`` holds ``z_{t+1}`` (the last row 0), so a
    boundary put on the next word's first symbol marks the end of the word before it."""
    return torch.cat([z[1:], z.new_zeros((1,) + tuple(z.shape[1:]))])


def offset_rates(z: Tensor, labels: Tensor, offsets: tuple[int, ...] = OFFSETS) -> list[dict[str, float]]:
    """Per column of ``z [N, k]``: its mean over the positions ``d`` away from each word end
    (``labels [N]``), for each ``d`` of ``offsets``; ends whose ``t + d`` falls outside are
    left out. Keys are the offsets as text (``"-1"``, ``"0"``, ``"+1"``)."""
    ends = labels.reshape(-1).nonzero().squeeze(1)
    rows = [{} for _ in range(z.shape[1])]
    for d in offsets:
        at = ends + d
        at = at[(at >= 0) & (at < z.shape[0])]
        for j, row in enumerate(rows):
            row[f"{d:+d}" if d else "0"] = float(z[at, j].float().mean()) if at.numel() else float("nan")
    return rows


def compare_word_ends(
    hm: TextPass, lstm: TextPass, labels: Tensor, baseline: str = "surprisal", peaks_only: bool = True,
    tolerances: tuple[int, ...] = (0, 1),
) -> dict:
    """(a) and (b): every HM layer's ``z`` and the LSTM baseline fired at that layer's rate.

    Args:
        hm: the HM-LSTM's pass over the text (layers with a detector: all but the top).
        lstm: the LSTM's pass over the same symbols.
        labels: 0/1 gold word ends ``[N]``.
        baseline: ``surprisal`` or ``entropy`` (see the module).
        peaks_only: fire on local peaks of the score only.
        tolerances: F1 tolerances reported.

    Returns:
        ``{"hm": [row per layer], "baseline": [row per layer, at that layer's rate],
        "hm_next": [...], "baseline_next": [...], "offsets": [per layer], "pr_curve": [...],
        "gold_rate": float}``; a row has ``rate``, ``precision``, ``recall``, ``f1`` and
        ``f1_tol{t}``; ``*_next`` read the HM layers one symbol later (see the module).
    """
    if baseline not in BASELINES:
        raise ValueError(f"compare_word_ends: baseline must be one of {', '.join(BASELINES)}, got {baseline!r}")
    n = labels.numel()
    if hm.boundaries.shape[0] != n or lstm.surprisal.numel() != n:
        raise ValueError(f"compare_word_ends: {n} labels, {hm.boundaries.shape[0]} HM steps, {lstm.surprisal.numel()} LSTM steps")
    layers = hm.boundaries.shape[1] - 1  # the top layer has no detector
    if layers < 1:
        raise ValueError("compare_word_ends: the HM model has no layer with a boundary detector")
    z = (hm.boundaries[:, :layers] > 0.5).float()
    scores = getattr(lstm, baseline)

    def against_baseline(pred: Tensor) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
        rows = score(pred, labels, tolerances)
        fired = torch.stack([fire_at_rate(scores, row["rate"], peaks_only) for row in rows], -1)
        return rows, score(fired, labels, tolerances)

    hm_rows, base_rows = against_baseline(z)
    next_rows, next_base = against_baseline(one_symbol_later(z))
    rates = sorted(set(PR_RATES) | {round(row["rate"], 4) for row in hm_rows + next_rows})
    return {
        "gold_rate": float(labels.float().mean()),
        "hm": hm_rows,
        "baseline": base_rows,
        "hm_next": next_rows,
        "baseline_next": next_base,
        "offsets": offset_rates(z, labels),
        "pr_curve": pr_curve(scores, labels, rates, peaks_only),
    }


def stream_windows(ids: Tensor, labels: Tensor, window: int):
    """``(inputs, targets, labels)`` windows ``[1, window]`` of one stream, as the probe reads
    them (targets are not used by it and are the inputs shifted by one)."""
    out = []
    for begin in range(0, ids.numel() - 1, window):
        stop = min(begin + window, ids.numel() - 1)
        out.append((ids[begin:stop].long().unsqueeze(0), ids[begin + 1 : stop + 1].long().unsqueeze(0),
                    labels[begin:stop].reshape(1, -1, 1)))
    return out
