"""``hmrnn predict``: per-symbol log-probabilities (bits) and every layer's boundaries for a text file.

Registered as a small command, so it replaces LightningCLI's ``predict`` subcommand (which
needs a ``predict_step`` and a predict dataloader that a character model has no use for).

Choices made here:

* the model first reads an end of line (when its vocabulary has one, as ``hmrnn sample``
  does), so the first symbol of the file gets a probability too; without one, the first
  symbol's ``bits`` cell is empty;
* the text streams through the model in windows of ``--window`` symbols with the state
  carried from window to window, so memory stays flat and the result equals one pass over
  the whole text;
* ``z{l}`` in a row is the boundary layer ``l`` emits after reading that row's symbol;
* the file is read as the model's training data read its files (a PTB model reads
  ``ptb.char.valid.txt`` as written: symbols separated by spaces, see :mod:`.model_text`), and a
  row is one symbol.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from pathlib import Path

from hmrnn_lightning.commands.options import DefaultsHelpFormatter, check_output_file
from hmrnn_lightning.commands.runs import fail

ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hmrnn predict", formatter_class=DefaultsHelpFormatter,
        description="Write one TSV row per symbol of a text file: position, symbol (\\n, \\t escaped), bits "
        "(-log2 of the probability the model gave it) and z1..zL-1 (each layer's boundary after it).",
    )
    p.add_argument("--ckpt_path", required=True, help="language-model checkpoint written by `hmrnn fit`")
    p.add_argument("--text", required=True,
                   help="UTF-8 text file written as the model's training files are (a PTB model: ptb.char.valid.txt itself)")
    p.add_argument("--out", required=True, help="TSV file to write")
    p.add_argument("--window", type=int, default=1000, help="symbols per forward pass (state carried between)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    return p


def cmd_predict(argv: list[str]) -> int:
    """hmrnn predict: per-symbol bits and boundaries for a text file."""
    import torch

    from hmrnn_lightning.checkpoints import load_model
    from hmrnn_lightning.commands.model_text import model_symbols
    from hmrnn_lightning.models.language_model import HMRNNLanguageModel

    args = parser().parse_args(argv)
    if args.window <= 0:
        fail(f"--window must be positive, got {args.window}")
    check_output_file(args.out)
    text = read_text(args.text)
    device = pick_device(args.device)
    model = load_model(args.ckpt_path, HMRNNLanguageModel).to(device).eval()
    if model.vocab is None:
        fail(f"{args.ckpt_path}: the checkpoint holds no vocabulary, so text cannot be encoded")
    symbols = model_symbols(model, text, args.text)
    if not symbols:
        fail(f"{args.text} holds no symbols (only blank lines)")
    start = ["\n"] if "\n" in model.vocab else []
    ids = model.encode(start + symbols, "text")[0]
    offset = len(start)  # inputs before the first symbol of the file
    layers = model.stack.num_layers
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    total_bits, scored = 0.0, 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("\t".join(["position", "symbol", "bits"] + [f"z{l + 1}" for l in range(layers - 1)]) + "\n")
            state, prev_logp = None, None
            with torch.no_grad():
                for begin in range(0, len(ids), args.window):
                    chunk = ids[begin : begin + args.window]
                    logits, res = model(chunk.unsqueeze(0), state)
                    state = res.state
                    logp = torch.log_softmax(logits[0].float(), -1)
                    z = res.boundaries[0].cpu()
                    for k in range(len(chunk)):
                        t = begin + k  # index in ids
                        pos = t - offset
                        if pos >= 0:
                            sym = int(chunk[k])
                            lp = prev_logp[sym].item() if prev_logp is not None else None
                            bits = "" if lp is None else f"{-lp / math.log(2):.4f}"
                            if lp is not None:
                                total_bits, scored = total_bits - lp / math.log(2), scored + 1
                            cells = [str(pos), escape(symbols[pos]), bits] + [f"{float(z[k, l]):g}" for l in range(layers - 1)]
                            f.write("\t".join(cells) + "\n")
                        prev_logp = logp[k]
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    mean = f"{total_bits / scored:.4f} bits/symbol" if scored else "no symbol scored"
    print(f"hmrnn: wrote {out}: {len(symbols)} symbols, {mean}")
    return 0


def escape(symbol: str) -> str:
    return "".join(ESCAPES.get(c, c) for c in symbol)


def read_text(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        fail(f"text file not found: {path}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        fail(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason})")
    if not text:
        fail(f"{path} is empty")
    return text


def pick_device(name: str):
    """A torch device; an unavailable CUDA device is one clear line, not a traceback."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        fail(f"--device {name!r} is not a device (cpu, cuda, cuda:N, mps)")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {name}: CUDA is not available on this machine")
    if device.type == "mps" and not torch.backends.mps.is_available():
        fail(f"--device {name}: MPS is not available on this machine")
    return device


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
