"""Training and sampling throughput: HM-LSTM (reference loop and fast paths) against torch.nn.LSTM.

    python bench/throughput.py --device cpu --shapes ptb --steps 3 --warmup 1
    python bench/throughput.py --device cpu --shapes ptb --impls lstm hm_sequence --boundary-bias -1
    python bench/throughput.py --device cuda --shapes ptb text8 --out bench/results/h100.jsonl
    OMP_NUM_THREADS=1 python bench/throughput.py --device cpu --shapes cpu --impls lstm hm_sequence --layer-norm

Each measurement runs in its own subprocess (so peak memory is that run's alone) and prints one
JSON line with keys impl, shape, device, chars_per_s, peak_mem_mb, ratio_vs_lstm (and more);
a Markdown table follows. A training step is forward + backward + Adam on random symbols, with
the truncated-BPTT state carried; the HM-LSTM has the paper's gated output module and
`nn.LSTM` (cuDNN on GPU, oneDNN on CPU) a linear softmax head, so the HM side does more work.
Sampling feeds one symbol at a time without gradients, for the whole batch and for one sequence
(`HMStack.step`: rows in COPY cost nothing, so its speed depends on how often layers fire;
the JSON line records the rates seen). Peak memory is the GPU's peak allocation on CUDA and
the process's peak resident size on CPU.

Impls: lstm; hm_reference (the readable loop); hm_sequence (one autograd function over the
sequence with row skipping, what `impl="auto"` picks on a CPU); hm_triton (matrix products and
Triton kernels, dense, what `impl="auto"` picks on a GPU; under TRITON_INTERPRET=1 it runs on a
CPU, far too slowly to time); hm_triton_graph (hm_triton with each training window captured in a
CUDA graph, `HMStack(cuda_graph=True)`).

Precision (`--precision`, one or more): `fp32` is strict fp32 on both sides, TF32 off for the
matrix products (`torch.backends.cuda.matmul.allow_tf32`) and for cuDNN (`torch.backends.cudnn.allow_tf32`,
which PyTorch turns on by default, so an unqualified cuDNN "fp32" LSTM runs on TF32 tensor cores);
`tf32` turns both on, for the HM-LSTM's products and cuDNN's LSTM alike; `bf16` is autocast. On
CUDA the default is `fp32 tf32`, so fp32 is reported both ways; on a CPU the flags do nothing and
the default is `fp32`. The table's precision column says which is which.

`--profile FILE` runs one impl and shape under torch.profiler for two training steps after the
warm-up and writes the table of where the time went (by CUDA / CPU time) to FILE.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

SHAPES = {  # the paper's: layers x hidden, embedding, batch, length, vocab, output embedding
    "ptb": dict(layers=3, hidden=512, emb=128, batch=64, length=100, vocab=50, out_emb=512),
    "text8": dict(layers=3, hidden=1024, emb=128, batch=128, length=100, vocab=27, out_emb=2048),
    # configs/cpu/: the small LayerNorm HM-LSTM trained on a CPU
    "cpu": dict(layers=3, hidden=128, emb=64, batch=32, length=100, vocab=50, out_emb=128),
    "tiny": dict(layers=3, hidden=64, emb=16, batch=8, length=50, vocab=30, out_emb=64),
}
IMPLS = ("lstm", "hm_reference", "hm_sequence", "hm_triton", "hm_triton_graph")
PRECISION_LABELS = {"fp32": "fp32 (strict, TF32 off)", "tf32": "fp32 (TF32 on)", "bf16": "bf16 autocast"}


def build(impl: str, shape: dict, device: str, layer_norm: bool, boundary_bias: float | None = None):
    import torch
    from torch import nn

    from hmrnn_lightning import HMStack, SoftmaxHead, StepEstimator

    emb = nn.Embedding(shape["vocab"], shape["emb"])
    if impl == "lstm":
        rnn = nn.LSTM(shape["emb"], shape["hidden"], shape["layers"], batch_first=True)
        head = nn.Linear(shape["hidden"], shape["vocab"])
        modules = nn.ModuleList([emb, rnn, head]).to(device)
        state = None

        def step(x, y):
            nonlocal state
            out, st = rnn(emb(x), state)
            state = tuple(s.detach() for s in st)
            return nn.functional.cross_entropy(head(out).flatten(0, 1), y.flatten())

        def sample_step(x, st):
            out, st = rnn(emb(x), st)
            return head(out[:, -1]), st

        return modules, step, sample_step
    hm_impl = impl.removeprefix("hm_").removesuffix("_graph")
    stack = HMStack(shape["emb"], [shape["hidden"]] * shape["layers"], StepEstimator(), layer_norm=layer_norm,
                    impl=hm_impl, cuda_graph=impl.endswith("_graph"))
    if boundary_bias is not None:
        with torch.no_grad():
            for cell in stack.cells[:-1]:
                cell.bias[-1] = boundary_bias
    head = SoftmaxHead([shape["hidden"]] * shape["layers"], shape["vocab"], shape["out_emb"])
    modules = nn.ModuleList([emb, stack, head]).to(device)
    state = None

    def step(x, y):
        nonlocal state
        out = stack(emb(x), state)
        state = [s.detach() for s in out.state]
        return head.nll(head(out.hidden), y).mean()

    cache = None

    def sample_step(x, st):
        nonlocal cache
        if st is None:
            cache = None
        out = stack.step(emb(x[:, -1]), st)
        logits, cache = head.step(out, cache)
        return logits[:, -1], out.state

    return modules, step, sample_step


def measure(impl: str, shape_name: str, device: str, steps: int, warmup: int, layer_norm: bool, precision: str,
            boundary_bias: float | None = None, profile: str | None = None) -> dict:
    import torch

    torch.manual_seed(0)
    shape = SHAPES[shape_name]
    modules, step, sample_step = build(impl, shape, device, layer_norm, boundary_bias)
    opt = torch.optim.Adam(modules.parameters(), lr=1e-3)
    B, T, V = shape["batch"], shape["length"], shape["vocab"]
    x = torch.randint(0, V, (B, T), device=device)
    y = torch.randint(0, V, (B, T), device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=precision == "bf16")
    # the same setting on both sides: strict fp32 unless tf32 was asked for (cuDNN's default is TF32 on)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for k in range(warmup + steps):
        if k == warmup:
            sync()
            start = time.perf_counter()
        with autocast:
            loss = step(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync()
    elapsed = time.perf_counter() - start
    if profile:
        write_profile(profile, device, lambda: train_step(step, opt, x, y, autocast), sync)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # whole process, KiB on Linux
    row = {
        "impl": impl, "shape": shape_name, "device": device, "layer_norm": layer_norm, "precision": precision,
        "precision_label": PRECISION_LABELS[precision], "boundary_bias": boundary_bias, "batch": B, "length": T,
        "hidden": shape["hidden"], "layers": shape["layers"],
        "steps": steps, "chars_per_s": B * T * steps / elapsed, "peak_mem_mb": peak,
        "device_name": torch.cuda.get_device_name() if device == "cuda" else f"cpu x{torch.get_num_threads()}",
    }
    # sampling: one symbol at a time, no gradient, for the whole batch and for one sequence
    n_sample = 200 if device == "cuda" else 60
    for key, batch in (("sample_chars_per_s", B), ("sample1_chars_per_s", 1)):
        rates = []
        with torch.no_grad(), autocast:
            st, tok = None, x[:batch, :1]
            for k in range(n_sample + 10):
                if k == 10:
                    sync()
                    s0 = time.perf_counter()
                logits, st = sample_step(tok, st)
                tok = torch.multinomial(torch.softmax(logits.float(), -1), 1)
                if isinstance(st, list):  # an HM state: keep the boundaries, average them after the clock
                    rates.append([s.z for s in st])
            sync()
            row[key] = batch * n_sample / (time.perf_counter() - s0)
        if rates and batch == B:  # how often each layer fired while sampling: the work COPY saved
            row["sample_boundary_rate"] = [round(float(torch.stack([r[l] for r in rates]).float().mean()), 3)
                                           for l in range(len(rates[0]))]
    return row


def train_step(step, opt, x, y, autocast) -> None:
    with autocast:
        loss = step(x, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def write_profile(path: str, device: str, run, sync) -> None:
    """Two training steps under torch.profiler; the table of operators by total time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(2):
            run()
        sync()
    key = "cuda_time_total" if device == "cuda" else "cpu_time_total"
    with open(path, "w") as f:
        f.write(prof.key_averages().table(sort_by=key, row_limit=40))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--shapes", nargs="+", default=["ptb"], choices=list(SHAPES))
    p.add_argument("--impls", nargs="+", default=["lstm", "hm_reference", "hm_sequence"], choices=IMPLS)
    p.add_argument("--steps", type=int, default=5, help="timed training steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, cuDNN autotune)")
    p.add_argument("--layer-norm", action="store_true", help="LayerNorm HM-LSTM (nn.LSTM has none)")
    p.add_argument("--precision", nargs="+", default=None, choices=list(PRECISION_LABELS),
                   help="one or more; default fp32 and tf32 on CUDA, fp32 on a CPU (see above)")
    p.add_argument("--boundary-bias", type=float, default=None,
                   help="set the boundary detectors' bias (e.g. -1: sparse boundaries, as after training); "
                        "the JSON line records the firing rates seen while sampling")
    p.add_argument("--out", default=None, help="append the JSON lines to this file")
    p.add_argument("--profile", default=None, metavar="FILE",
                   help="profile the first impl of --impls on the first of --shapes and write the table to FILE")
    p.add_argument("--single", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: this torch sees no CUDA device (torch.cuda.is_available() is False)")
    if args.single or args.profile:
        impl, shape = args.single.split(":") if args.single else (args.impls[0], args.shapes[0])
        precision = (args.precision or ["fp32"])[0]
        print(json.dumps(measure(impl, shape, args.device, args.steps, args.warmup, args.layer_norm, precision,
                                 args.boundary_bias, args.profile)))
        return
    precisions = args.precision or (["fp32", "tf32"] if args.device == "cuda" else ["fp32"])
    rows = []
    for shape, precision in [(s, p) for s in args.shapes for p in precisions]:
        base = None
        for impl in args.impls:
            cmd = [sys.executable, __file__, "--single", f"{impl}:{shape}", "--device", args.device, "--steps",
                   str(args.steps), "--warmup", str(args.warmup), "--precision", precision]
            cmd += ["--layer-norm"] if args.layer_norm else []
            cmd += ["--boundary-bias", str(args.boundary_bias)] if args.boundary_bias is not None else []
            proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
            if proc.returncode != 0:
                print(json.dumps({"impl": impl, "shape": shape, "device": args.device, "precision": precision,
                                  "error": proc.stderr[-800:]}))
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            if impl == "lstm":
                base = row
            row["ratio_vs_lstm"] = row["chars_per_s"] / base["chars_per_s"] if base else None
            row["sample_ratio_vs_lstm"] = row["sample_chars_per_s"] / base["sample_chars_per_s"] if base else None
            row["sample1_ratio_vs_lstm"] = row["sample1_chars_per_s"] / base["sample1_chars_per_s"] if base else None
            row["mem_ratio_vs_lstm"] = row["peak_mem_mb"] / base["peak_mem_mb"] if base else None
            rows.append(row)
            line = json.dumps(row)
            print(line, flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(line + "\n")
    print("\n| impl | shape | precision | device | train chars/s | vs nn.LSTM | peak MB | vs nn.LSTM | sample chars/s (batch) "
          "| vs nn.LSTM | sample chars/s (1) | vs nn.LSTM | boundary rate while sampling |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    fmt = lambda v, spec: "" if v is None else format(v, spec)  # noqa: E731
    for r in rows:
        print(f"| {r['impl']} | {r['shape']} | {r['precision_label']} | {r['device_name']} | {r['chars_per_s']:,.0f} | {fmt(r['ratio_vs_lstm'], '.3f')} "
              f"| {r['peak_mem_mb']:,.0f} | {fmt(r['mem_ratio_vs_lstm'], '.2f')} | {r['sample_chars_per_s']:,.0f} "
              f"| {fmt(r['sample_ratio_vs_lstm'], '.3f')} | {r['sample1_chars_per_s']:,.0f} "
              f"| {fmt(r['sample1_ratio_vs_lstm'], '.3f')} | {r.get('sample_boundary_rate', '')} |")


if __name__ == "__main__":
    main()
