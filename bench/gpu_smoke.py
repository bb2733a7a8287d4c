"""The GPU questions of the HM-LSTM's Triton path, one stage at a time (``bench/gpu_smoke.sh`` runs
them all in one device call, each under its own timeout).

    python bench/gpu_smoke.py accuracy --out smoke.jsonl   # Triton vs the fp64 reference, 3 x 512
    python bench/gpu_smoke.py graph                         # CUDA graph vs eager, 3 windows, grads summed
    python bench/gpu_smoke.py times                         # window fwd+bwd: fp32 / TF32 / bf16 vs cuDNN
    python bench/gpu_smoke.py profile                       # kernels per window, GPU-busy vs wall time
    python bench/gpu_smoke.py accuracy --tiny --device cpu  # the same under TRITON_INTERPRET=1 (tests)

Every stage prints one JSON line per measurement (and appends it to ``--out``) as soon as it has
it, so a stage cut off by its timeout still leaves what it finished. ``ok`` in a line is the
stage's verdict; the exit status is 1 when any verdict is false.

Precision names, used the same way for the HM-LSTM and for ``nn.LSTM``: ``fp32`` is strict fp32
(TF32 off for matmul and cuDNN), ``tf32`` allows TF32 tensor cores on both sides (cuDNN's own
default for its LSTM), ``bf16`` is autocast to bfloat16.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from hmrnn_lightning import HMStack, StepEstimator  # noqa: E402

FULL = dict(layers=3, hidden=512, batch=64, steps=100, input=128)  # the PTB shape of the paper
TINY = dict(layers=3, hidden=24, batch=3, steps=12, input=8)
FP32_FLOOR = 1e-4  # fp32 gradient error accepted whatever the reference loop's own (see stage_accuracy)


def emit(row: dict, out: str | None) -> dict:
    line = json.dumps(row)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")
    return row


@contextlib.contextmanager
def precision(name: str, device: str):
    """Strict fp32, TF32 or bf16 autocast, for both models alike."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = name == "tf32"
    try:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=name == "bf16"):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def make_stack(size: dict, layer_norm: bool, impl: str, device: str, graph: bool = False) -> HMStack:
    torch.manual_seed(0)
    stack = HMStack(size["input"], [size["hidden"]] * size["layers"], StepEstimator(slope=1.0),
                    layer_norm=layer_norm, impl=impl, cuda_graph=graph)
    return stack.to(device)


def window_loss(stack: nn.Module, x: torch.Tensor, probe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A scalar that reads every layer's output, and the boundaries (None for nn.LSTM)."""
    if isinstance(stack, nn.LSTM):
        h, _ = stack(x)
        return (h.float() * probe[..., : h.shape[-1]]).sum(), None
    out = stack(x)
    hidden = torch.cat([h.float() for h in out.hidden], dim=-1)
    return (hidden * probe).sum(), out.boundaries


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: for tensors whose entries span many magnitudes."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def forward_backward(stack: nn.Module, x: torch.Tensor, probe: torch.Tensor, dtype: torch.dtype):
    stack.zero_grad(set_to_none=True)
    x = x.detach().to(dtype).clone().requires_grad_(True)
    loss, z = window_loss(stack, x, probe.to(dtype))
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in stack.named_parameters() if p.grad is not None}
    grads["input"] = x.grad.detach().clone()
    return loss.detach(), z, grads


def stage_accuracy(args, size: dict) -> list[dict]:
    """The fast paths in fp32 against the reference loop in fp64 on the same device. A path passes
    when its gradients are within ``FP32_FLOOR`` of the fp64 ones (relative to each tensor's
    largest entry) or within 4x the reference loop's own fp32 error, whichever is larger, and it
    takes the same boundary decisions on at least 99.9% of steps. The floor is needed because
    the fast paths sum in another order (merged products, fused steps): at the tiny test shape
    the reference loop's fp32 error was 3.7e-7 and the fast paths' 1.4e-5 to 1.6e-5, all
    rounding; a wrong kernel is off by orders of magnitude more (a 1% error is 1e-2)."""
    rows = []
    impls = ["triton", "sequence"]
    for layer_norm in (False, True):
        ref = make_stack(size, layer_norm, "reference", args.device).double()
        torch.manual_seed(1)
        x = torch.randn(size["batch"], size["steps"], size["input"], device=args.device)
        probe = torch.randn(size["batch"], size["steps"], size["hidden"] * size["layers"], device=args.device)
        with precision("fp32", args.device):
            _, z64, g64 = forward_backward(ref, x, probe, torch.float64)
            ref32 = make_stack(size, layer_norm, "reference", args.device)
            _, z32, g32 = forward_backward(ref32, x, probe, torch.float32)
            base = max(relative_error(g32[k], g64[k]) for k in g64)
            for impl in impls:
                fast = copy.deepcopy(ref32)
                fast.impl = impl
                try:
                    _, zf, gf = forward_backward(fast, x, probe, torch.float32)
                except Exception as err:  # a compile error is an answer, not a crash of the stage
                    rows.append(emit({"stage": "accuracy", "impl": impl, "layer_norm": layer_norm, "ok": False,
                                      "error": f"{type(err).__name__}: {err}"[:500]}, args.out))
                    continue
                agree = float((zf == z64).float().mean())
                worst = max(relative_error(gf[k], g64[k]) for k in g64)
                ok = agree >= 0.999 and worst <= max(4 * base, FP32_FLOOR)
                rows.append(emit({"stage": "accuracy", "impl": impl, "active": fast.active_impl(), "layer_norm": layer_norm,
                                  "shape": size, "boundary_agreement": agree, "grad_rel_err": worst,
                                  "reference_fp32_grad_rel_err": base, "ok": ok}, args.out))
    return rows


def stage_graph(args, size: dict) -> list[dict]:
    """Three windows through a captured graph, gradients accumulated over them, equal to the same
    three windows run eagerly (same device, same precision)."""
    if args.device != "cuda":
        return [emit({"stage": "graph", "skipped": "CUDA graphs need a GPU", "ok": True}, args.out)]
    rows = []
    for layer_norm in (False, True):
        eager = make_stack(size, layer_norm, "triton", args.device)
        graphed = copy.deepcopy(eager)
        graphed.cuda_graph = True
        torch.manual_seed(2)
        xs = [torch.randn(size["batch"], size["steps"], size["input"], device=args.device) for _ in range(3)]
        probe = torch.randn(size["batch"], size["steps"], size["hidden"] * size["layers"], device=args.device)
        losses = {}
        for name, stack in (("eager", eager), ("graph", graphed)):
            stack.zero_grad(set_to_none=True)
            total = []
            for x in xs:
                loss, _ = window_loss(stack, x, probe)
                loss.backward()
                total.append(float(loss))
            losses[name] = (total, {n: p.grad.clone() for n, p in stack.named_parameters()})
        worst = max(relative_error(losses["graph"][1][n], losses["eager"][1][n]) for n in losses["eager"][1])
        loss_err = max(abs(a - b) / max(abs(b), 1e-30) for a, b in zip(losses["graph"][0], losses["eager"][0]))
        rows.append(emit({"stage": "graph", "layer_norm": layer_norm, "grad_rel_err": worst, "loss_rel_err": loss_err,
                          "ok": worst <= 1e-5 and loss_err <= 1e-5}, args.out))
    return rows


def _time_windows(stack: nn.Module, x: torch.Tensor, probe: torch.Tensor, repeats: int, name: str) -> tuple[float, float]:
    """Milliseconds per window (forward and backward) and peak memory in MB."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    with precision(name, x.device.type):
        for _ in range(2):  # compilation, autotuning, graph capture
            window_loss(stack, x, probe)[0].backward()
        sync()
        if x.is_cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(repeats):
            window_loss(stack, x, probe)[0].backward()
        sync()
    peak = torch.cuda.max_memory_allocated() / 2**20 if x.is_cuda else float("nan")
    return 1000 * (time.perf_counter() - start) / repeats, peak


def stage_times(args, size: dict) -> list[dict]:
    """Stack-only window times (no embedding, no head): HM-LSTM eager and graph in fp32, TF32 and
    bf16, each beside nn.LSTM of the same size in the same precision."""
    rows = []
    torch.manual_seed(3)
    x = torch.randn(size["batch"], size["steps"], size["input"], device=args.device)
    probe = torch.randn(size["batch"], size["steps"], size["hidden"] * size["layers"], device=args.device)
    lstm = nn.LSTM(size["input"], size["hidden"], size["layers"], batch_first=True).to(args.device)
    for name in ("fp32", "tf32", "bf16"):
        lstm_ms, lstm_mb = _time_windows(lstm, x, probe, args.repeats, name)
        rows.append(emit({"stage": "times", "model": "nn.LSTM", "precision": name, "ms_per_window": lstm_ms,
                          "peak_mb": lstm_mb, "ok": True}, args.out))
        for graph in ([False, True] if args.device == "cuda" else [False]):
            for layer_norm in (False, True):
                stack = make_stack(size, layer_norm, "auto", args.device, graph)
                ms, mb = _time_windows(stack, x, probe, args.repeats, name)
                rows.append(emit({"stage": "times", "model": "HM-LSTM", "impl": stack.active_impl(), "graph": graph,
                                  "layer_norm": layer_norm, "precision": name, "ms_per_window": ms, "peak_mb": mb,
                                  "vs_lstm": lstm_ms / ms, "ok": True}, args.out))
    return rows


def stage_profile(args, size: dict) -> list[dict]:
    """Kernels launched per window and the GPU's busy time against the wall time."""
    from torch.profiler import ProfilerActivity, profile

    rows = []
    torch.manual_seed(4)
    x = torch.randn(size["batch"], size["steps"], size["input"], device=args.device)
    probe = torch.randn(size["batch"], size["steps"], size["hidden"] * size["layers"], device=args.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    for name, stack in (("nn.LSTM", nn.LSTM(size["input"], size["hidden"], size["layers"], batch_first=True).to(args.device)),
                        ("HM-LSTM", make_stack(size, True, "auto", args.device)),
                        ("HM-LSTM graph", make_stack(size, True, "auto", args.device, graph=args.device == "cuda"))):
        with precision("bf16", args.device):
            for _ in range(2):
                window_loss(stack, x, probe)[0].backward()
            if args.device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            with profile(activities=activities) as prof:
                window_loss(stack, x, probe)[0].backward()
                if args.device == "cuda":
                    torch.cuda.synchronize()
            wall = time.perf_counter() - start
        events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        busy_us = sum(e.device_time for e in events) if events else 0.0
        rows.append(emit({"stage": "profile", "model": name, "precision": "bf16", "kernels": len(events),
                          "gpu_busy_ms": busy_us / 1000, "wall_ms": 1000 * wall,
                          "busy_share": (busy_us / 1e6) / wall if wall else 0.0, "ok": True}, args.out))
    return rows


STAGES = {"accuracy": stage_accuracy, "graph": stage_graph, "times": stage_times, "profile": stage_profile}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=list(STAGES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--tiny", action="store_true", help=f"the shape {TINY} instead of {FULL} (CPU tests)")
    parser.add_argument("--repeats", type=int, default=10, help="timed windows per measurement (times stage)")
    parser.add_argument("--out", default=None, help="append the JSON lines to this file")
    args = parser.parse_args(argv)
    rows = STAGES[args.stage](args, TINY if args.tiny else FULL)
    return 0 if rows and all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
