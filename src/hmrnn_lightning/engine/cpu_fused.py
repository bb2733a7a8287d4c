"""The GPU window's per-step kernels, compiled for a CPU: one call per layer and step.

The sequence backend (:mod:`~hmrnn_lightning.engine.sequence`) runs each layer and step as
about 500 small PyTorch operations; at the CPU configs' size (3 x 128, batch 32) their
per-call overhead, not the arithmetic, was most of a window's time. The GPU's window
(:mod:`~hmrnn_lightning.engine.triton_window`) already does the same step as one product and one
kernel (two of each with layer norm). This module gives that loop CPU kernels with the Triton
kernels' contract (:mod:`~hmrnn_lightning.engine.kernels`: ``step_forward`` and
``step_backward``, launched by keyword as ``kernel[(rows,)](...)``, None for a pointer a switch
turns off, rows ``ROW`` apart, each norm's own eps, ``top_z``), written in C++ (``cpu_fused.cpp``
beside this file) and built once per machine with the system compiler. The sequence backend's
``window`` runs them where :func:`why_not` says it can, through the Triton window's loop.

Why C++ through ``ctypes`` rather than ``torch.compile``: the kernels need no PyTorch headers, so
a build takes seconds (a PyTorch extension needs about a minute), and a call costs a few
microseconds; the switches (layer, layer norm, estimator) would each be a separate compiled
graph under ``torch.compile``, with guards checked on every call. The report of this change
has the measurements.

Differences from the Triton kernels: the arithmetic is in the tensors' dtype (float32 or
float64; the Triton kernels compute in float32), and the code is compiled with fast-math
(reassociated sums, vector ``exp``), so results agree with the reference to rounding, not bit
for bit; COPY still returns ``h``, ``c`` and ``z`` exactly (its weights are 0 and 1).

Where there is no C++ compiler, or the build fails, :func:`kernels` returns None (announced
once at debug level) and the caller keeps its PyTorch loop.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

#: Run CPU windows through these kernels where they can (:func:`why_not`); False keeps the
#: sequence path's PyTorch loop (the tests run both).
ENABLED = True

#: The widest layer the kernels run. They are dense; the sequence loop skips the rows whose
#: terms are zero, which pays for its per-call overhead only at larger widths. Measured
#: 2026-12-07 (one thread, a stack window's forward and backward, batch 32 x 100 at widths 128
#: and 256, 64 x 100 at 512; fused against the sequence loop, alternating in one process, 4 runs
#: each): 3 x 128 with layer norm 0.23-0.32 s against 0.55-0.85 s (layer 1 firing on 51% of
#: steps), 0.22-0.32 s against 0.55-0.62 s (2%); 3 x 256 at 17%: 0.73-0.99 s against 0.93-1.14 s;
#: 3 x 512 without layer norm: 4.2-5.0 s against 4.2-4.6 s at 49%, but 4.6-6.1 s against 2.4-3.0 s at 0%.
MAX_HIDDEN = 256

_SOURCE = Path(__file__).with_name("cpu_fused.cpp")

# Bits of the C functions' ``flags`` argument: the Triton kernels' boolean switches.
_FLAG_BITS = {
    "HAS_BASE": 1, "HAS_BELOW": 4, "BELOW_GATED": 8, "NORM_BELOW": 16, "NORM_CELL": 32, "TOP": 64,
    "WRITE_OWN": 128, "WRITE_UP": 256, "WRITE_DOWN": 512, "HAS_GH": 1024, "HAS_GZ": 2048, "HAS_GLOGIT": 4096,
    "HAS_DREC": 8192, "HAS_DXA": 16384, "HAS_DXB": 32768, "FLUSH_GRAD": 65536,
}
# Fast-math for the vector exp (glibc declares libmvec's variants only under __FAST_MATH__ with
# finite math; the kernels clamp exp's argument so that no inf arises, cpu_fused.cpp's sigm); linked
# in a second step without the flag, so that the library does not switch the process to flush
# denormals.
_COMPILE_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp-simd", "--param=vect-max-peeling-for-alignment=0", "-fPIC", "-std=c++17"]

_P, _I, _D = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
# The C functions' arguments after (rows, H, ROW, flags, mode), by the Triton kernels' keyword
# names: a pointer (a tensor, or None for one a switch turns off), a row stride, or a float.
_FORWARD = (
    ("s_ptr", _P), ("base_ptr", _P), ("base_stride", _I), ("below_ptr", _P), ("gb_ptr", _P), ("bb_ptr", _P),
    ("c_prev_ptr", _P), ("h_prev_ptr", _P), ("zp_ptr", _P), ("zb_ptr", _P), ("gc_ptr", _P), ("bc_ptr", _P),
    ("given_ptr", _P), ("slope_ptr", _P), ("c_ptr", _P), ("h_ptr", _P), ("z_ptr", _P), ("e_ptr", _P),
    ("logit_ptr", _P), ("own_ptr", _P), ("own_stride", _I), ("up_ptr", _P), ("up_stride", _I), ("down_ptr", _P),
    ("down_stride", _I), ("below_eps", _D), ("cell_eps", _D), ("top_z", _D),
)
_BACKWARD = (
    ("s_ptr", _P), ("below_ptr", _P), ("gb_ptr", _P), ("bb_ptr", _P), ("dgb_ptr", _P), ("dbb_ptr", _P),
    ("c_ptr", _P), ("c_prev_ptr", _P), ("h_prev_ptr", _P), ("h_ptr", _P), ("zp_ptr", _P), ("zb_ptr", _P),
    ("e_ptr", _P), ("slope_ptr", _P), ("gc_ptr", _P), ("bc_ptr", _P), ("dgc_ptr", _P), ("dbc_ptr", _P),
    ("gh_ptr", _P), ("dh_ptr", _P), ("dc_ptr", _P), ("dz_ptr", _P), ("gz_ptr", _P), ("glogit_ptr", _P),
    ("drec_ptr", _P), ("drec_stride", _I), ("dxa_ptr", _P), ("dxa_stride", _I), ("dxb_ptr", _P),
    ("dxb_stride", _I), ("dzb_ptr", _P), ("z_ptr", _P), ("below_eps", _D), ("cell_eps", _D),
)
#: The Triton launch's keywords that are not the C function's: the block size and warp count.
_IGNORED = frozenset({"BLOCK", "num_warps"})


def _cache_dir() -> Path:
    base = os.environ.get("HMRNN_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "hmrnn-lightning"
    )
    return Path(base) / "cpu_fused"


def _build(source: Path, target: Path) -> None:
    """Compile ``source`` into the shared library ``target``, atomically (a process that loads
    it while another builds sees the whole file or none)."""
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++ or c++) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        obj, lib = Path(tmp) / "cpu_fused.o", Path(tmp) / target.name
        for cmd in ([compiler, *_COMPILE_FLAGS, "-c", str(source), "-o", str(obj)],
                    [compiler, "-shared", str(obj), "-o", str(lib), "-lmvec", "-lm"]):
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr[-500:]}")
        os.replace(lib, target)


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL | None:
    """The compiled kernels, built on first use and kept per source version; None where they
    cannot be built or loaded (announced once, at debug level)."""
    try:
        digest = hashlib.sha256(_SOURCE.read_bytes() + " ".join(_COMPILE_FLAGS).encode()).hexdigest()[:16]
        target = _cache_dir() / f"cpu_fused-{digest}.so"
        if not target.exists():
            _build(_SOURCE, target)
        lib = ctypes.CDLL(str(target))
        for suffix in ("f32", "f64"):
            getattr(lib, f"step_forward_{suffix}").argtypes = [_I] * 5 + [kind for _, kind in _FORWARD]
            getattr(lib, f"step_backward_{suffix}").argtypes = [_I] * 5 + [kind for _, kind in _BACKWARD]
        return lib
    except (OSError, RuntimeError, AttributeError) as err:
        log.debug("hmrnn_lightning: the fused CPU kernels are unavailable (%s); the CPU keeps the PyTorch loop", err)
        return None


class _Launcher:
    """A C step function launched as :mod:`~hmrnn_lightning.engine.kernels` launches the Triton
    kernel: ``kernel[(rows,)](**arguments, **switches)``, all by keyword. Each argument goes to
    its place in the C signature (tensors as their data pointers, None as a null pointer, an
    ``int`` as an address already, from :meth:`~hmrnn_lightning.engine.triton_window._Launch.at`,
    a slice of a tensor the window allocated, or checked, in the kernels' dtype); the
    boolean switches become bits of ``flags``; ``BLOCK`` and ``num_warps`` are ignored. A keyword
    the C function lacks, or a missing one, raises: the Triton kernel grew an argument that the
    port must learn too."""

    def __init__(self, lib: ctypes.CDLL, name: str, arguments: tuple) -> None:
        self._functions = {torch.float32: getattr(lib, f"{name}_f32"), torch.float64: getattr(lib, f"{name}_f64")}
        self._order = tuple(n for n, _ in arguments)
        self._pointers = tuple(i for i, (_, kind) in enumerate(arguments) if kind is _P)
        self._names = frozenset(self._order)
        self._switches = tuple(_FLAG_BITS)
        # a call's switch values (and keyword count) to its flags: a call site repeats a few
        self._flags: dict[tuple, int] = {}

    def __getitem__(self, grid: tuple[int, ...]):
        return functools.partial(self._launch, grid[0])

    def _launch(self, rows: int, *, H: int, ROW: int, MODE: int = 0, **kwargs) -> None:
        # per layer and step, so written for speed: about 5 us here against a 30-50 us kernel
        dtype = kwargs["s_ptr"].dtype
        function = self._functions.get(dtype)
        if function is None:
            raise TypeError(f"the fused CPU kernels run float32 and float64, not {dtype}")
        key = (len(kwargs), *map(kwargs.get, self._switches))
        flags = self._flags.get(key)
        if flags is None:
            unknown = set(kwargs) - self._names - _IGNORED - set(self._switches)
            if unknown:
                raise TypeError(f"the fused CPU kernel has no argument {', '.join(sorted(unknown))}")
            flags = self._flags[key] = sum(bit for name, bit in _FLAG_BITS.items() if kwargs.get(name))
        values = [kwargs[name] for name in self._order]  # a missing one raises KeyError
        for i in self._pointers:
            value = values[i]
            if value is not None and not isinstance(value, int):
                if value.dtype != dtype or not value.is_cpu:
                    raise TypeError(f"{self._order[i]}: a {value.dtype} tensor on {value.device}, "
                                    f"the kernel runs {dtype} on the CPU")
                values[i] = value.data_ptr()
        function(rows, H, ROW, flags, MODE, *values)


@functools.lru_cache(maxsize=None)
def kernels() -> tuple[_Launcher, _Launcher] | None:
    """``(step_forward, step_backward)`` for CPU tensors, launched like
    :mod:`~hmrnn_lightning.engine.kernels`' Triton kernels; None where they cannot be built here."""
    lib = _library()
    if lib is None:
        return None
    return _Launcher(lib, "step_forward", _FORWARD), _Launcher(lib, "step_backward", _BACKWARD)


def why_not(plan, x: Tensor) -> str | None:
    """None when the fused CPU kernels can run the window of ``plan``
    (:class:`~hmrnn_lightning.engine.plan.WindowPlan`) on ``x``; else the reason. The sequence
    backend asks it per window and per generation step."""
    if not ENABLED:
        return "cpu_fused.ENABLED is False"
    from hmrnn_lightning.engine.plan import kernel_mode

    if x.device.type != "cpu":
        return "it runs on a CPU"
    if plan.product_dtype is not None:
        # under autocast the window's products round unlike the reference loop's with layer
        # norm (tests/engine/test_fast_paths.py's bf16 test); the sequence loop matches it
        return "it runs without autocast"
    if x.dtype not in (torch.float32, torch.float64):
        return "it runs float32 and float64 states"
    if any(w.dtype != x.dtype for w in plan.flat_weights()):  # the kernels read every tensor in one dtype
        return "it runs weights in the input's dtype"
    if max(plan.sizes) > MAX_HIDDEN:
        return f"layers wider than {MAX_HIDDEN} run faster with the sequence loop's row skipping"
    if kernel_mode(plan.estimator) is None:
        # (Bernoulli's noise is drawn for the whole window in one call, as on a GPU: the
        # reference draws per step, so the draws differ from the reference's, not their law)
        return f"it runs the step, Bernoulli and soft estimators, not {type(plan.estimator).__name__}"
    if kernels() is None:
        return "the kernels could not be built (no C++ compiler?)"
    return None
