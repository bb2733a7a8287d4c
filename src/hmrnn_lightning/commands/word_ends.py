"""``hmrnn word-ends``: on text without separators, does the HM-LSTM find word ends better than an LSTM?

Takes two checkpoints trained with ``remove_separators`` (an HM-LSTM and an LSTM) and a text
written with its separators (as the training files are: PTB's ``ptb.char.test.txt`` itself),
from which the gold word ends are read before the separators are removed, as the datamodule
does. It reports, with :mod:`hmrnn_lightning.metrics.word_ends`:

(a) each HM layer's ``z``: firing rate, precision, recall, F1 exact and within one step;
(b) the LSTM's surprisal (or entropy) peaks fired at that layer's rate (every peak, and a line
    saying so, where there are fewer peaks than the layer fires);
(c) a linear probe on every layer of both models, fitted on ``--fit_text`` (the validation
    file) and scored on ``--text``;

and writes everything, with the baseline's precision-recall curve, to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hmrnn_lightning.commands.options import DefaultsHelpFormatter, check_output_file, check_seed
from hmrnn_lightning.commands.runs import fail

HINT = "train it with --data.init_args.remove_separators true"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hmrnn word-ends", formatter_class=DefaultsHelpFormatter,
        description="Word ends found without spaces: score an HM-LSTM's boundaries (z of each layer) and an "
        "LSTM's surprisal peaks, fired at the same rate as each HM layer (at most on every local peak: a line "
        "says when there are fewer), against the gold word ends of a text; "
        "and a linear probe on both models' hidden states. Both checkpoints must come from "
        "`hmrnn fit` with --data.init_args.remove_separators true; give the text WITH its separators "
        "(written as the training files are): they mark the gold word ends and are removed before the "
        "models read it. F1 pairs predictions with word ends one-to-one (exact, and within one step). "
        "Surprisal sees the next symbol and z does not, so each layer is also scored 'read 1 later' (its z on "
        "the next word's first symbol taken as the end of the word before); --baseline entropy is the causal "
        "baseline. The last lines give each layer's firing rate just before, on and just after word ends.",
    )
    p.add_argument("--hm_ckpt", required=True, help="HM-LSTM checkpoint (a stack with boundary detectors)")
    p.add_argument("--lstm_ckpt", required=True, help="LSTM checkpoint: the baseline's surprisal and the second probe")
    p.add_argument("--text", required=True, help="text to score, with separators (e.g. ptb.char.test.txt)")
    p.add_argument("--fit_text", default=None,
                   help="text the probes are fitted on, with separators (e.g. ptb.char.valid.txt); without it no probe")
    p.add_argument("--baseline", choices=("surprisal", "entropy"), default="surprisal",
                   help="LSTM score: surprisal of the next symbol (sees that symbol), or entropy of the next-symbol "
                   "distribution (sees only the past, as z does)")
    p.add_argument("--all_positions", action="store_true",
                   help="rank every position by the score, not only its local peaks")
    p.add_argument("--max_symbols", type=int, default=None,
                   help="read only the first N symbols (after the separators are removed) of each text")
    p.add_argument("--window", type=int, default=1000, help="symbols per forward pass (state carried between)")
    p.add_argument("--probe_max_fit", type=int, default=40_000, help="most positions each probe fits on")
    p.add_argument("--seed", type=int, default=0, help="draws the probe's fitting positions")
    p.add_argument("--out", default=None, help="JSON file for every number, the precision-recall curve included")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    return p


def cmd_word_ends(argv: list[str]) -> int:
    """hmrnn word-ends: HM-LSTM boundaries vs LSTM surprisal peaks vs a probe, without separators."""
    from hmrnn_lightning.checkpoints import load_model
    from hmrnn_lightning.commands.predict import pick_device, read_text
    from hmrnn_lightning.metrics import word_ends
    from hmrnn_lightning.models.language_model import HMRNNLanguageModel

    args = parser().parse_args(argv)
    for flag in ("window", "probe_max_fit", "max_symbols"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            fail(f"--{flag} must be positive, got {value}")
    check_seed(args.seed)
    if args.out is not None:
        check_output_file(args.out)
    device = pick_device(args.device)
    models = {}
    for role, path in (("hm", args.hm_ckpt), ("lstm", args.lstm_ckpt)):
        models[role] = load_model(path, HMRNNLanguageModel).to(device).eval()
        if models[role].vocab is None:
            fail(f"{path}: the checkpoint holds no vocabulary, so text cannot be encoded")
    if not hasattr(models["hm"].stack, "estimator") or models["hm"].stack.num_layers < 2:
        fail(f"--hm_ckpt {args.hm_ckpt}: its stack ({type(models['hm'].stack).__name__}) has no boundary detectors")
    readers = {role: separated_reader(models[role], path) for role, path in (("hm", args.hm_ckpt), ("lstm", args.lstm_ckpt))}
    texts = {"text": args.text} | ({"fit_text": args.fit_text} if args.fit_text else {})
    data = {}
    for name, path in texts.items():
        raw = read_text(path)
        per_model = {role: readers[role](raw) for role in models}
        if per_model["hm"][0] != per_model["lstm"][0]:
            fail(f"the two checkpoints read --{name} {path} as different symbols (trained on different corpora?)")
        symbols, labels = per_model["hm"]
        if args.max_symbols is not None:
            symbols, labels = symbols[: args.max_symbols], labels[: args.max_symbols]
        if len(symbols) < 2 or labels.sum() == 0:
            fail(f"--{name} {path}: no word ends to score ({len(symbols)} symbols after the separators are removed)")
        ids = {}
        for role, model in models.items():
            try:
                ids[role] = model.encode(symbols, f"--{name} {path}")[0].cpu()
            except ValueError as exc:
                fail(str(exc))
        data[name] = (symbols, labels, ids)

    symbols, labels, ids = data["text"]
    passes = {role: word_ends.read_text(models[role], ids[role], args.window) for role in models}
    result = word_ends.compare_word_ends(passes["hm"], passes["lstm"], labels, args.baseline, not args.all_positions)
    result.update(text=args.text, symbols=len(symbols), words=int(labels.sum()), baseline_name=args.baseline,
                  peaks_only=not args.all_positions)
    if "fit_text" in data:
        from hmrnn_lightning.metrics.probe import probe_word_boundaries

        _, fit_labels, fit_ids = data["fit_text"]
        result["probe"] = {}
        for role, model in models.items():
            found = probe_word_boundaries(
                model, word_ends.stream_windows(fit_ids[role], fit_labels, args.window),
                word_ends.stream_windows(ids[role], labels, args.window), max_fit=args.probe_max_fit, ahead=(0,),
                seed=args.seed)
            result["probe"][role] = [
                {"f1": found[f"probe_f1/l{l + 1}_word"], "f1_tol1": found[f"probe_f1_tol1/l{l + 1}_word"]}
                for l in range(model.stack.num_layers)]
    print(table(result))
    if args.out is not None:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"hmrnn: wrote {out}")
    return 0


def separated_reader(model, path: str):
    """``text -> (symbols without separators, word-end labels)`` as ``model``'s training data
    read text; fails unless the model was trained with ``remove_separators``."""
    import torch

    from hmrnn_lightning.data.base import remove_word_separators
    from hmrnn_lightning.registry import RegistryError, import_path

    reading = getattr(model, "text_reading", None)
    if not isinstance(reading, dict) or not isinstance(reading.get("datamodule"), str):
        fail(f"{path}: the checkpoint does not say how its text was read, so not that its separators were removed; {HINT}")
    options = dict(reading.get("options") or {})
    if not options.pop("remove_separators", False):
        fail(f"{path}: this model was trained on text with separators, so its word ends are given away; {HINT}")
    try:
        cls = import_path(reading["datamodule"])
    except RegistryError as exc:
        fail(f"{path}: its datamodule cannot be imported ({exc})")

    def read(text: str):
        kept, ends = remove_word_separators(cls.text_to_symbols(text, **options), cls.word_end_symbols)
        return list(kept), torch.as_tensor(ends, dtype=torch.float32)

    return read


def table(result: dict) -> str:
    """The printed report: one pair of rows per HM layer, then the probes."""
    name = f"LSTM {result['baseline_name']} {'peaks' if result['peaks_only'] else 'ranks'}"
    lines = [
        f"word ends in {result['text']}: {result['symbols']} symbols without separators, {result['words']} word ends "
        f"(rate {result['gold_rate']:.3f})",
        f"{'detector':<40}{'rate':>7}{'prec':>7}{'recall':>7}{'F1':>7}{'F1 ±1':>7}",
    ]
    for suffix, hm_key, base_key in (("", "hm", "baseline"), (" read 1 later", "hm_next", "baseline_next")):
        for l, (hm, base) in enumerate(zip(result[hm_key], result[base_key]), start=1):
            for label, row in ((f"HM-LSTM z, layer {l}{suffix}", hm), (f"{name} at layer {l}'s rate", base)):
                lines.append(f"{label:<40}{row['rate']:7.3f}{row['precision']:7.3f}{row['recall']:7.3f}"
                             f"{row['f1']:7.3f}{row['f1_tol1']:7.3f}")
    short = [l for l, (hm, base) in enumerate(zip(result["hm"], result["baseline"]), start=1)
             if base["rate"] < hm["rate"] - 0.5 / max(result["symbols"], 1)]
    if short:
        lines.append(f"(the {name} fire below the rate of layer {', '.join(map(str, short))}: the score has fewer "
                     f"local peaks than that layer fires, and every peak fires; --all_positions ranks every position)")
    best = max(range(len(result["hm"])), key=lambda k: result["hm"][k]["f1"])
    hm, base = result["hm"][best], result["baseline"][best]
    lines.append(f"best HM layer: {best + 1}, F1 {hm['f1']:.3f} against {base['f1']:.3f} for the {name} at rate {base['rate']:.3f}")
    lines.append("('read 1 later': z of the symbol after, as the end of the word before; surprisal also sees "
                 "that symbol, z alone does not)")
    for l, row in enumerate(result["offsets"], start=1):
        where = ", ".join(f"{d}: {rate:.2f}" for d, rate in row.items())
        lines.append(f"layer {l} fires on the symbols around a word's last one (offset: rate) {where}")
    for role, rows in result.get("probe", {}).items():
        who = "HM-LSTM" if role == "hm" else "LSTM"
        for l, row in enumerate(rows, start=1):
            label = f"linear probe, {who} layer {l}"
            lines.append(f"{label:<40}{'':>7}{'':>7}{'':>7}{row['f1']:7.3f}{row['f1_tol1']:7.3f}")
    return "\n".join(lines)
