"""``hmrnn sample``: generate text from a language-model checkpoint."""

from __future__ import annotations

from hmrnn_lightning.cli import require_file


def cmd_sample(argv: list[str]) -> int:
    """hmrnn sample: generate text from a checkpoint."""
    import argparse

    import torch

    from hmrnn_lightning.models.language_model import HMRNNLanguageModel

    p = argparse.ArgumentParser(prog="hmrnn sample", description="Generate text from a trained language model checkpoint.")
    p.add_argument("--ckpt_path", required=True, help="checkpoint written by `hmrnn fit`")
    p.add_argument("--prime", default="", help="text the model reads before generating")
    p.add_argument("--length", type=int, default=200, help="symbols to generate")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (> 0; lower is greedier)")
    p.add_argument("--seed", type=int, default=None, help="random seed")
    args = p.parse_args(argv)
    require_file(args.ckpt_path, "checkpoint")
    if args.seed is not None:
        torch.manual_seed(args.seed)
    model = HMRNNLanguageModel.load_from_checkpoint(args.ckpt_path, map_location="cpu")
    print(model.generate(args.prime, args.length, args.temperature))
    return 0
