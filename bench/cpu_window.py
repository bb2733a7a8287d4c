"""One stack window (forward and backward) on a CPU: the fused kernels against the PyTorch loop.

    OMP_NUM_THREADS=1 taskset -c 0 python bench/cpu_window.py --hidden 128 --batch 32 --layer-norm
    OMP_NUM_THREADS=1 taskset -c 0 python bench/cpu_window.py --hidden 512 --batch 64 --boundary-bias -1
    OMP_NUM_THREADS=1 taskset -c 0 python bench/cpu_window.py --hidden 128 --batch 32 --layer-norm --kernel-calls

The two paths alternate in one process (fused, loop, fused, ...), so both see the same machine;
each time is one window after a warm-up window, in milliseconds, sorted. ``--boundary-bias``
shifts every layer's boundary-logit bias (the loop skips rows whose terms are zero, so its
speed depends on how often layers fire; the line prints the rates). ``--kernel-calls`` times
the fused kernels' calls of one window instead: per call, the whole launch and the C function
alone (the rest is the launcher's Python), forward and backward. This is what
``cpu_fused.MAX_HIDDEN`` was chosen from; ``bench/throughput.py`` times whole training steps.
"""

from __future__ import annotations

import argparse
import time

import torch

from hmrnn_lightning import HMStack, StepEstimator
from hmrnn_lightning.engine import cpu_fused, triton_window


def build(args) -> tuple[HMStack, torch.Tensor]:
    torch.manual_seed(args.seed)
    stack = HMStack(args.emb, [args.hidden] * args.layers, StepEstimator(), layer_norm=args.layer_norm, impl="sequence")
    with torch.no_grad():
        for cell in stack.cells:
            cell.bias[-1] += args.boundary_bias
    return stack, torch.randn(args.batch, args.length, args.emb)


def window(stack: HMStack, x: torch.Tensor) -> torch.Tensor:
    out = stack(x)
    sum(h.sum() for h in out.hidden).backward()
    return out.boundaries[..., :-1].detach().mean(dim=(0, 1))


def compare_paths(args) -> None:
    stack, x = build(args)
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.repeats):
        for fused in (True, False):
            cpu_fused.ENABLED, cpu_fused.MAX_HIDDEN = fused, 1 << 30
            rates = window(stack, x)  # warm-up (and the fused kernels' build, the first time)
            start = time.perf_counter()
            window(stack, x)
            times[fused].append((time.perf_counter() - start) * 1e3)
    print(f"{args.layers} x {args.hidden}, batch {args.batch} x {args.length}, layer norm {args.layer_norm}, "
          f"rates {[round(float(r), 2) for r in rates]}: fused {sorted(round(t) for t in times[True])} ms, "
          f"PyTorch loop {sorted(round(t) for t in times[False])} ms")


def kernel_calls(args) -> None:
    """Per call of the fused kernels in one window: the whole launch, and the C function alone."""
    stack, x = build(args)
    launchers = dict(zip(("forward", "backward"), cpu_fused.kernels()))
    recorded: dict[str, list] = {name: [] for name in launchers}
    # a window hands the kernels addresses of its buffers, which are freed when it ends; views
    # keep them alive for the replay below (the launcher then reads each view's address, a
    # little more Python per call than in a window)
    at = triton_window._Launch.at
    triton_window._Launch.at = lambda self, tensor, *index: None if tensor is None else tensor[index]
    originals = {}
    for name, launcher in launchers.items():
        originals[name] = launcher._launch

        def record(rows, _name=name, _launch=launcher._launch, **kwargs):
            recorded[_name].append((rows, kwargs))
            return _launch(rows, **kwargs)

        launcher._launch = record
    try:
        window(stack, x)
    finally:
        triton_window._Launch.at = at
    for name, launcher in launchers.items():
        launcher._launch = originals[name]
        calls = recorded[name]

        def per_call() -> float:  # the fastest of 5 passes over the window's calls, in us
            best = float("inf")
            for _ in range(5):
                start = time.perf_counter()
                for rows, kwargs in calls:
                    launcher._launch(rows, **kwargs)  # recomputes in place: the values are garbage, the time is not
                best = min(best, time.perf_counter() - start)
            return best / len(calls) * 1e6

        whole = per_call()
        real = launcher._functions
        launcher._functions = {dtype: (lambda *a: None) for dtype in real}
        python = per_call()
        launcher._functions = real
        print(f"{name}: {len(calls)} calls, {whole:.1f} us a call, of which the launcher's Python {python:.1f} us")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--emb", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--length", type=int, default=100)
    p.add_argument("--layer-norm", action="store_true")
    p.add_argument("--boundary-bias", type=float, default=0.0)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kernel-calls", action="store_true", help="time the fused kernels' calls instead")
    args = p.parse_args()
    if cpu_fused.kernels() is None:
        raise SystemExit("cpu_window: the fused CPU kernels could not be built here (no C++ compiler?)")
    (kernel_calls if args.kernel_calls else compare_paths)(args)


if __name__ == "__main__":
    main()
