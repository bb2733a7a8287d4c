"""How the gradient of one window grows with its length, for each place layer norm can go.

    python bench/gradient_growth.py --text ../shared/data/ptb/ptb.char.valid.txt
    python bench/gradient_growth.py --hidden 512 --lengths 100       # the PTB width

A freshly initialised model reads the first ``T`` symbols of ``batch`` parallel streams of the
text from a zero state; the printed figure is the global norm of the loss gradient (before any
clipping). A stable recurrence gives about the same norm at every length; an unstable one grows
geometrically. Four boundary regimes: the step estimator at slope 1 and at slope 5 (its
straight-through gradient is ``a / 2``), at slope 1 with ``flush_gradient=False`` (no gradient to
``z^l_{t-1}`` through the choice of operation), at slope 1 with ``boundary_init="below_only"`` (the
boundary unit's recurrent and top-down rows start at zero), and oracle boundaries that make every
layer FLUSH at every step (no estimator gradient at all). ``--seeds 0 1 2 3`` repeats it per seed: the
straight-through loop's growth depends on the initial weights.

Placements (``HMCell.NORMALISED_TERMS``, plus the cell's own layer norm):
  * ``all terms``: recurrent, top-down and bottom-up each normalised (this project until 2026-11-23);
  * ``rec+bottom``: recurrent and bottom-up;
  * ``bottom`` (shipped): bottom-up only;
  * ``none``: no layer norm anywhere; and the LayerNorm LSTM baseline for reference.

One JSON line per (placement, regime, length) goes to ``--out`` when given.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import torch

from hmrnn_lightning.cells import HMLSTMCell, HMStack, LSTMStack
from hmrnn_lightning.estimators import StepEstimator
from hmrnn_lightning.heads import SoftmaxHead
from hmrnn_lightning.models import HMRNNLanguageModel

PLACEMENTS = {
    "all terms": ("recurrent", "top_down", "bottom_up"),
    "rec+bottom": ("recurrent", "bottom_up"),
    "bottom": ("bottom_up",),
    "none": None,
    "ln_lstm": "lstm",
}
REGIMES = ("step a=1", "step a=5", "a=1 no flush grad", "a=1 below-only init", "all FLUSH")


def symbol_streams(path: Path, batch: int) -> torch.Tensor:
    """``[batch, n]`` ids of the text's characters (``ptb.char`` files: space-separated symbols)."""
    text = path.read_text()
    symbols = text.split() if path.name.startswith("ptb.char") else list(text)
    index = {s: i for i, s in enumerate(sorted(set(symbols)))}
    ids = torch.tensor([index[s] for s in symbols])
    n = len(ids) // batch
    return ids[: n * batch].view(batch, n), len(index)


def build(placement: str, vocab: int, hidden: int, layers: int, emb: int, seed: int,
          flush_gradient: bool = True, boundary_init: str = "uniform") -> HMRNNLanguageModel:
    torch.manual_seed(seed)
    terms = PLACEMENTS[placement]
    if terms == "lstm":
        stack = functools.partial(LSTMStack, hidden_sizes=[hidden] * layers, layer_norm=True)
        return HMRNNLanguageModel(vocab, stack, functools.partial(SoftmaxHead, embed_dim=hidden), embedding_dim=emb)
    stack = functools.partial(
        HMStack, hidden_sizes=[hidden] * layers, estimator=StepEstimator(), layer_norm=terms is not None, impl="reference",
        flush_gradient=flush_gradient, boundary_init=boundary_init,
    )
    shipped = HMLSTMCell.NORMALISED_TERMS
    HMLSTMCell.NORMALISED_TERMS = terms or ()  # read when the cells are built
    try:
        return HMRNNLanguageModel(vocab, stack, functools.partial(SoftmaxHead, embed_dim=hidden), embedding_dim=emb)
    finally:
        HMLSTMCell.NORMALISED_TERMS = shipped


def grad_norm(model: HMRNNLanguageModel, streams: torch.Tensor, length: int, regime: str) -> float:
    model.zero_grad()
    x, y = streams[:, :length], streams[:, 1 : length + 1]
    oracle = None
    if regime == "all FLUSH" and hasattr(model.stack, "estimator"):
        oracle = torch.ones(x.shape[0], length, model.stack.num_layers - 1)
    if regime == "step a=5" and hasattr(model.stack, "estimator"):
        model.stack.estimator.set_slope(5.0)
    logits, _ = model(x, None, oracle)
    model.head.nll(logits, y).mean().backward()
    return float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--text", type=Path, default=Path("../shared/data/ptb/ptb.char.valid.txt"))
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--emb", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lengths", type=int, nargs="+", default=[5, 25, 50, 100])
    p.add_argument("--placements", nargs="+", default=list(PLACEMENTS), choices=list(PLACEMENTS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--out", type=Path, default=None, help="append JSON lines here")
    args = p.parse_args(argv)
    if not args.text.is_file():
        p.error(f"--text {args.text}: no such file")
    streams, vocab = symbol_streams(args.text, args.batch)
    rows = []
    print("| seed | placement | regime | " + " | ".join(f"T={t}" for t in args.lengths) + " |")
    print("|---|---|---|" + "---|" * len(args.lengths))
    for seed in args.seeds:
        for placement in args.placements:
            for regime in REGIMES if PLACEMENTS[placement] != "lstm" else REGIMES[:1]:
                norms = []
                for length in args.lengths:
                    model = build(placement, vocab, args.hidden, args.layers, args.emb, seed,
                                  flush_gradient=regime != "a=1 no flush grad",
                                  boundary_init="below_only" if regime == "a=1 below-only init" else "uniform")
                    norms.append(grad_norm(model, streams, length, regime))
                    rows.append(dict(seed=seed, placement=placement, regime=regime, length=length, grad_norm=norms[-1],
                                     hidden=args.hidden, layers=args.layers, batch=args.batch, text=args.text.name))
                print(f"| {seed} | {placement} | {regime} | " + " | ".join(f"{n:.3g}" for n in norms) + " |", flush=True)
    if args.out:
        with args.out.open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
