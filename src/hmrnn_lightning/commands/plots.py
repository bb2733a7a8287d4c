"""``hmrnn plot-boundaries``, ``sample-strokes`` and ``plot-segments``: the paper's figures from a checkpoint."""

from __future__ import annotations

from pathlib import Path

from hmrnn_lightning.checkpoints import load_model

from hmrnn_lightning.commands.options import DefaultsHelpFormatter, check_output_file, check_seed, decode_escapes
from hmrnn_lightning.commands.runs import fail
from hmrnn_lightning.data.base import DataError


def check_out(path: str) -> None:
    """Refuse an ``--out`` whose extension names no figure format, or that cannot be written
    (a folder, under a file), before any work."""
    from hmrnn_lightning.viz.files import FigureFormatError, figure_format

    try:
        figure_format(path)
    except FigureFormatError as exc:
        fail(f"--out {exc}")
    check_output_file(path)


def cmd_plot_boundaries(argv: list[str]) -> int:
    """hmrnn plot-boundaries: the paper's Figures 3-4 for a text, from a checkpoint."""
    import argparse

    from hmrnn_lightning.commands.model_text import model_symbols, reads_without_separators
    from hmrnn_lightning.models.language_model import HMRNNLanguageModel
    from hmrnn_lightning.viz import plot_boundaries

    p = argparse.ArgumentParser(
        prog="hmrnn plot-boundaries",
        description="Draw each layer's boundaries (white/black blocks) and the l2 norm of each layer's h "
        "for a text, as in Figures 3 and 4 of the paper.",
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument("--ckpt_path", required=True, help="checkpoint written by `hmrnn fit`")
    p.add_argument("--text", required=True,
                   help="the text to analyse, written as the model's training files are (PTB: `t h e _ c a t`); "
                   "\\n, \\t and \\\\ are read as escapes. For a model trained with remove_separators, give it "
                   "with its separators: they are taken out before the model reads it and drawn as the known "
                   "word ends, in red under the model's rows")
    p.add_argument("--out", default="boundaries.png", help="figure to write; the extension picks the format (.png, .pdf, .svg...)")
    p.add_argument("--title", default=None, help="title above the figure (default: the checkpoint's file name)")
    args = p.parse_args(argv)
    check_out(args.out)
    text = decode_escapes(args.text, "--text")
    if not text:
        fail("--text is empty; give the text to analyse")
    model = load_model(args.ckpt_path, HMRNNLanguageModel)
    if model.vocab is None:
        fail(f"{args.ckpt_path}: the checkpoint holds no vocabulary, so text cannot be encoded")
    # read as training read text: for a model trained without separators they are taken out here
    symbols = model_symbols(model, text, "--text")
    gold = None
    if reads_without_separators(model):
        from hmrnn_lightning.commands.word_ends import separated_reader

        gold = {"word end": separated_reader(model, args.ckpt_path)(text)[1].numpy()}
    # the model's symbols are single characters: joined, they label the figure's columns one each
    text = "".join(symbols)
    if not text:
        fail("--text holds no symbols (only blank lines)")
    z, norms = model.analyse(text)
    path = plot_boundaries(text, z.numpy(), norms.numpy(), args.out, title=args.title or Path(args.ckpt_path).name,
                           gold=gold)
    print(f"wrote {path}")
    return 0


def cmd_sample_strokes(argv: list[str]) -> int:
    """hmrnn sample-strokes: draw sampled handwriting from a checkpoint."""
    import argparse

    from hmrnn_lightning.models.handwriting import HandwritingModel
    from hmrnn_lightning.viz import plot_strokes

    p = argparse.ArgumentParser(prog="hmrnn sample-strokes", description="Sample pen strokes from a handwriting checkpoint and draw them.",
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--ckpt_path", required=True, help="checkpoint written by `hmrnn fit --config configs/iam_*.yaml`")
    p.add_argument("--length", type=int, default=700, help="points to sample")
    p.add_argument("--bias", type=float, default=0.5, help="sampling bias (0: unbiased; larger: neater)")
    p.add_argument("--seed", type=int, default=None, help="random seed (0 to 2**64 - 1)")
    p.add_argument("--out", default="sample.png", help="figure to write; the extension picks the format (.png, .pdf, .svg...)")
    args = p.parse_args(argv)
    check_out(args.out)
    if args.length <= 0:
        fail(f"--length must be positive, got {args.length}")
    if not args.bias >= 0:  # nan compares false
        fail(f"--bias must be 0 or more, got {args.bias}")
    check_seed(args.seed)
    import torch

    if args.seed is not None:
        torch.manual_seed(args.seed)
    model = load_model(args.ckpt_path, HandwritingModel)
    title = f"{Path(args.ckpt_path).name}: {args.length} points, bias {args.bias:g}, seed {args.seed if args.seed is not None else 'random'}"
    print(f"wrote {plot_strokes(model.generate(args.length, args.bias), args.out, title=title)}")
    return 0


def cmd_plot_segments(argv: list[str]) -> int:
    """hmrnn plot-segments: the paper's Figure 5 for one line of the data."""
    import argparse

    from hmrnn_lightning.data.iam import IAMOnDBDataModule
    from hmrnn_lightning.models.handwriting import HandwritingModel
    from hmrnn_lightning.viz import plot_segments

    p = argparse.ArgumentParser(
        prog="hmrnn plot-segments",
        description="Draw one line twice (Figure 5 of the paper): coloured by segments from pen-up, and by "
        "segments from the boundaries of a layer of the model.",
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument("--ckpt_path", required=True, help="checkpoint written by `hmrnn fit --config configs/iam_*.yaml`")
    p.add_argument("--data_dir", default="data/iam-ondb", help="folder with lineStrokes-all.tar.xz and splits/")
    p.add_argument("--split", default="valid", choices=["train", "valid", "test"], help="which split the line is from")
    p.add_argument("--index", type=int, default=0, help="which line of the split")
    p.add_argument("--min_length", type=int, default=300, help="as in training: lines with fewer points are dropped")
    p.add_argument("--layer", type=int, default=None,
                   help="layer whose boundaries colour the second drawing, from 1 to the highest layer with a "
                   "boundary detector (default: 2 as in the paper, or the highest such layer when there are fewer)")
    p.add_argument("--out", default="segments.png", help="figure to write; the extension picks the format (.png, .pdf, .svg...)")
    args = p.parse_args(argv)
    check_out(args.out)
    model = load_model(args.ckpt_path, HandwritingModel)
    dm = IAMOnDBDataModule(args.data_dir, min_length=args.min_length)
    ds = dm.dataset(args.split)
    if not 0 <= args.index < len(ds):
        raise DataError(f"--index {args.index} is outside the {len(ds)} lines of the {args.split} split")
    inputs, _ = ds[args.index]
    z = model.boundaries_of(inputs).numpy()
    detectors = max(z.shape[1] - 1, 1)  # the top layer has no boundary detector
    if args.layer is not None and not 1 <= args.layer <= detectors:
        fail(f"--layer {args.layer}: this model's layers with a boundary detector are 1 to {detectors}")
    layer = args.layer if args.layer is not None else min(2, detectors)
    print(f"wrote {plot_segments(model.to_real_units(inputs), z, args.out, layer)}")
    return 0
