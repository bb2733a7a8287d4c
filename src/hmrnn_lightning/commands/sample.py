"""``hmrnn sample``: generate text from a language-model checkpoint.

Options as in other samplers people know (nanoGPT's ``sample.py``, torchtune's generate):
temperature, top-k, several samples, a device, and a prime given inline or from a file.
The unknown symbol is never sampled (see :meth:`HMRNNLanguageModel.generate`).
"""

from __future__ import annotations

import argparse
import math

from hmrnn_lightning.commands.options import DefaultsHelpFormatter, check_seed
from hmrnn_lightning.commands.runs import fail

SEPARATOR = "-" * 40


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hmrnn sample", description="Generate text from a trained language model checkpoint.",
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--ckpt_path", required=True, help="checkpoint written by `hmrnn fit`")
    prime = p.add_mutually_exclusive_group()
    prime.add_argument("--prime", default="",
                       help="text the model reads before generating, written as its training files are (PTB: `t h e _`)")
    prime.add_argument("--prime_file", default=None, help="UTF-8 file whose text the model reads before generating")
    p.add_argument("--length", type=int, default=200, help="symbols to generate per sample (>= 0)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (> 0; lower is greedier)")
    p.add_argument("--top_k", type=int, default=None, help="sample among the k most likely symbols only")
    p.add_argument("--num_samples", type=int, default=1, help="independent samples, separated by a line of dashes")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--seed", type=int, default=None, help="random seed (0 to 2**64 - 1)")
    return p


def cmd_sample(argv: list[str]) -> int:
    """hmrnn sample: generate text from a checkpoint."""
    import torch

    from hmrnn_lightning.checkpoints import load_model
    from hmrnn_lightning.commands.model_text import model_symbols
    from hmrnn_lightning.commands.predict import pick_device, read_text
    from hmrnn_lightning.models.language_model import HMRNNLanguageModel

    args = parser().parse_args(argv)
    if args.length < 0:
        fail(f"--length must be 0 or more, got {args.length}")
    if not (args.temperature > 0 and math.isfinite(args.temperature)):  # nan compares false
        fail(f"--temperature must be a finite number > 0, got {args.temperature} (lower values sample more greedily)")
    if args.top_k is not None and args.top_k <= 0:
        fail(f"--top_k must be positive, got {args.top_k}")
    if args.num_samples <= 0:
        fail(f"--num_samples must be positive, got {args.num_samples}")
    check_seed(args.seed)
    prime = read_text(args.prime_file) if args.prime_file else args.prime
    device = pick_device(args.device)
    if args.seed is not None:
        torch.manual_seed(args.seed)
    model = load_model(args.ckpt_path, HMRNNLanguageModel).to(device)
    if model.vocab is None:
        fail(f"{args.ckpt_path}: the checkpoint holds no vocabulary, so text cannot be generated")
    # the model's symbols are single characters, so joined they are a text it reads one by one
    prime = "".join(model_symbols(model, prime, args.prime_file or "--prime"))
    for k in range(args.num_samples):
        if k:
            print(SEPARATOR)
        print(model.generate(prime, args.length, args.temperature, args.top_k), flush=True)
    return 0
