"""``hmrnn plot-boundaries``, ``sample-strokes`` and ``plot-segments``: the paper's figures from a checkpoint."""

from __future__ import annotations

from pathlib import Path

from hmrnn_lightning.checkpoints import load_model

from hmrnn_lightning.commands.runs import fail
from hmrnn_lightning.data.base import DataError


def check_out(path: str) -> None:
    """Refuse an ``--out`` whose extension names no figure format, before any work."""
    from hmrnn_lightning.viz.files import FigureFormatError, figure_format

    try:
        figure_format(path)
    except FigureFormatError as exc:
        fail(f"--out {exc}")


def cmd_plot_boundaries(argv: list[str]) -> int:
    """hmrnn plot-boundaries: the paper's Figures 3-4 for a text, from a checkpoint."""
    import argparse

    from hmrnn_lightning.models.language_model import HMRNNLanguageModel
    from hmrnn_lightning.viz import plot_boundaries

    p = argparse.ArgumentParser(
        prog="hmrnn plot-boundaries",
        description="Draw each layer's boundaries (white/black blocks) and the l2 norm of each layer's h "
        "for a text, as in Figures 3 and 4 of the paper.",
    )
    p.add_argument("--ckpt_path", required=True, help="checkpoint written by `hmrnn fit`")
    p.add_argument("--text", required=True, help="the text to analyse (symbols of the model's vocabulary)")
    p.add_argument("--out", default="boundaries.png", help="figure to write; the extension picks the format (.png, .pdf, .svg...)")
    p.add_argument("--title", default=None, help="title above the figure (default: the checkpoint's file name)")
    args = p.parse_args(argv)
    check_out(args.out)
    model = load_model(args.ckpt_path, HMRNNLanguageModel)
    text = args.text.encode().decode("unicode_escape") if "\\" in args.text else args.text
    z, norms = model.analyse(text)
    path = plot_boundaries(text, z.numpy(), norms.numpy(), args.out, title=args.title or Path(args.ckpt_path).name)
    print(f"wrote {path}")
    return 0


def cmd_sample_strokes(argv: list[str]) -> int:
    """hmrnn sample-strokes: draw sampled handwriting from a checkpoint."""
    import argparse

    from hmrnn_lightning.models.handwriting import HandwritingModel
    from hmrnn_lightning.viz import plot_strokes

    p = argparse.ArgumentParser(prog="hmrnn sample-strokes", description="Sample pen strokes from a handwriting checkpoint and draw them.")
    p.add_argument("--ckpt_path", required=True, help="checkpoint written by `hmrnn fit --config configs/iam_*.yaml`")
    p.add_argument("--length", type=int, default=700, help="points to sample")
    p.add_argument("--bias", type=float, default=0.5, help="sampling bias (0: unbiased; larger: neater)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--out", default="sample.png", help="figure to write; the extension picks the format (.png, .pdf, .svg...)")
    args = p.parse_args(argv)
    check_out(args.out)
    if args.length <= 0:
        fail(f"--length must be positive, got {args.length}")
    if args.bias < 0:
        fail(f"--bias must be 0 or more, got {args.bias}")
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
    )
    p.add_argument("--ckpt_path", required=True)
    p.add_argument("--data_dir", default="data/iam-ondb", help="folder with lineStrokes-all.tar.xz and splits/")
    p.add_argument("--split", default="valid", choices=["train", "valid", "test"])
    p.add_argument("--index", type=int, default=0, help="which line of the split")
    p.add_argument("--min_length", type=int, default=300, help="as in training: lines with fewer points are dropped")
    p.add_argument("--layer", type=int, default=2, help="layer whose boundaries colour the second drawing")
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
    print(f"wrote {plot_segments(model.to_real_units(inputs), z, args.out, args.layer)}")
    return 0
