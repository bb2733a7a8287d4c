"""Compile the HM-LSTM Triton kernels for a GPU without one: Triton's real compiler, ahead of time.

    python bench/compile_kernels.py                    # H100 (sm_90a), PTB and Text8 widths
    python bench/compile_kernels.py --arch 80 --hidden 256 512 --out /tmp/kernels.jsonl
    python bench/compile_kernels.py --also /tmp/triton36/bin/python   # and with another Triton

The GPU machines may carry another Triton than this environment (torch 2.11 with Triton 3.6).
The kernels' module (``engine/kernels.py``) imports only Triton and is loaded here by its path,
so another Triton needs a virtual environment with that Triton alone, no torch::

    python3 -m venv /tmp/triton36 && /tmp/triton36/bin/pip install triton==3.6.0

``--also PYTHON`` runs this script again under each such interpreter, so one call reports every
variant with every Triton (the ``triton`` field of each line).

The tests run the kernels under Triton's interpreter, which executes the Python of a kernel on
numpy and so never meets the compiler's rules (types fixed per variable, constexpr branches,
register pressure). This script compiles every variant the GPU path launches (forward and
backward; first, middle and top layer; with and without layer norm) for the given
architecture and hidden sizes, then assembles each with the ptxas that ships with Triton and
prints one JSON line per kernel: registers per thread and spilled bytes at the warps
``kernels.num_warps`` picks. Exit status 1 if any variant fails to compile.
``TRITON_INTERPRET`` must be unset (the script unsets it for itself).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


KERNELS = Path(__file__).resolve().parents[1] / "src" / "hmrnn_lightning" / "engine" / "kernels.py"

#: Pointer arguments each variant passes as None (a switch turns them off), per kernel.
UNUSED = {
    "forward": lambda c: {"base_ptr": not c["HAS_BASE"], "below_ptr": not c["HAS_BELOW"],
                          "gb_ptr": not c["NORM_BELOW"], "bb_ptr": not c["NORM_BELOW"], "zb_ptr": not c["BELOW_GATED"],
                          "gc_ptr": not c["NORM_CELL"], "bc_ptr": not c["NORM_CELL"], "given_ptr": c["MODE"] not in (0, 2),
                          "e_ptr": c["TOP"], "logit_ptr": c["TOP"], "own_ptr": not c["WRITE_OWN"],
                          "up_ptr": not c["WRITE_UP"], "down_ptr": not c["WRITE_DOWN"]},
    "backward": lambda c: {"below_ptr": not c["HAS_BELOW"], "gb_ptr": not c["HAS_BELOW"], "bb_ptr": not c["HAS_BELOW"],
                           "dgb_ptr": not c["HAS_BELOW"], "dbb_ptr": not c["HAS_BELOW"], "zb_ptr": not c["BELOW_GATED"],
                           "e_ptr": c["TOP"], "gc_ptr": not c["NORM_CELL"], "bc_ptr": not c["NORM_CELL"],
                           "dgc_ptr": not c["NORM_CELL"], "dbc_ptr": not c["NORM_CELL"], "gh_ptr": not c["HAS_GH"],
                           "gz_ptr": not c["HAS_GZ"], "glogit_ptr": not c["HAS_GLOGIT"], "dxa_ptr": not c["HAS_DXA"],
                           "dxb_ptr": not c["HAS_DXB"], "dzb_ptr": not c["BELOW_GATED"]},
}


def load_kernels():
    """``engine/kernels.py`` by its path: it needs Triton only, not torch or the package."""
    spec = importlib.util.spec_from_file_location("hmrnn_kernels", KERNELS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def variants(hidden: int):
    """Every variant the Triton backend launches: forward and backward; first, middle and top
    layer; with and without layer norm; fp32 products (the bias in the product) and autocast
    (the kernel adds the bias or the first layer's input rows: ``HAS_BASE``); the backward with
    and without ``flush_gradient`` (``FLUSH_GRAD``)."""
    for layer_norm in (False, True):
        for layer in ("first", "middle", "top"):
            first, top = layer == "first", layer == "top"
            common = dict(H=hidden, ROW=(4 * hidden + 8) // 8 * 8, BELOW_GATED=not first, NORM_CELL=layer_norm, TOP=top)
            for has_base in (False, True):
                yield "forward", layer, layer_norm, dict(
                    common, HAS_BASE=has_base, HAS_BELOW=layer_norm, NORM_BELOW=layer_norm, MODE=1, WRITE_OWN=True,
                    WRITE_UP=not first, WRITE_DOWN=not top and not layer_norm)
            for flush_gradient in (True, False):
                yield "backward", layer, layer_norm, dict(common, HAS_BELOW=layer_norm, MODE=0 if top else 1, HAS_GH=True,
                                                          HAS_GZ=not top, HAS_GLOGIT=False, HAS_DREC=True,
                                                          HAS_DXA=not first, HAS_DXB=not top and not layer_norm,
                                                          FLUSH_GRAD=flush_gradient)


def assemble(ptx: str, arch: str) -> dict:
    """Registers and spills from Triton's own ptxas (whichever of its copies reads this PTX)."""
    import triton

    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        for name in ("ptxas", "ptxas-blackwell"):
            tool = os.path.join(bin_dir, name)
            if not os.path.exists(tool):
                continue
            proc = subprocess.run([tool, f"-arch=sm_{arch}", "-v", src, "-o", os.path.join(tmp, "k.cubin")],
                                  capture_output=True, text=True)
            if proc.returncode == 0:
                text = proc.stdout + proc.stderr
                regs = re.search(r"Used (\d+) registers", text)
                spills = re.search(r"(\d+) bytes spill stores", text)
                return {"registers": int(regs.group(1)) if regs else None,
                        "spill_store_bytes": int(spills.group(1)) if spills else None}
    return {"registers": None, "spill_store_bytes": None}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="90a", help="compute capability without the dot, e.g. 90a (H100), 80 (A100)")
    p.add_argument("--hidden", type=int, nargs="+", default=[512, 1024], help="layer widths to compile for")
    p.add_argument("--no-assemble", action="store_true", help="stop at PTX (no ptxas)")
    p.add_argument("--out", default=None, help="append the JSON lines to this file")
    p.add_argument("--also", nargs="*", default=[], metavar="PYTHON",
                   help="interpreters of other environments (each with its own Triton) to compile with as well")
    args = p.parse_args()
    missing = [python for python in args.also if not os.access(python, os.X_OK)]
    if missing:
        p.error(f"--also {' '.join(missing)}: no such interpreter (make that environment first; CONTRIBUTING.md says how)")

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    K = load_kernels()
    forward, backward = K.triton_kernels()
    capability = int(re.match(r"\d+", args.arch).group(0))
    target = GPUTarget("cuda", capability, 32)
    failed = 0
    for hidden in args.hidden:
        for kind, layer, layer_norm, constants in variants(hidden):
            fn = forward if kind == "forward" else backward
            unused = {name for name, off in UNUSED[kind](constants).items() if off}
            constants = dict(constants, BLOCK=K.block_size(hidden), **{name: None for name in unused})
            names = [q.name for q in fn.params]
            signature = {q.name: "constexpr" if q.is_constexpr or q.name in unused else
                         "fp32" if q.name.endswith(("eps", "top_z")) else "i32" if q.name.endswith("_stride") else "*fp32"
                         for q in fn.params}
            row = {"kernel": kind, "layer": layer, "layer_norm": layer_norm, "has_base": constants.get("HAS_BASE"),
                   "flush_gradient": constants.get("FLUSH_GRAD"),
                   "hidden": hidden, "arch": args.arch, "num_warps": K.num_warps(hidden), "triton": triton.__version__}
            try:
                source = ASTSource(fn=fn, signature=signature,
                                   constexprs={(names.index(k),): v for k, v in constants.items()})
                compiled = triton.compile(source, target=target, options={"num_warps": K.num_warps(hidden)})
                row["ptx_chars"] = len(compiled.asm["ptx"])
                if not args.no_assemble:
                    row.update(assemble(compiled.asm["ptx"], args.arch))
            except Exception as e:  # noqa: BLE001 - report every variant, then fail
                failed += 1
                row["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
            line = json.dumps(row)
            print(line, flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(line + "\n")
    for python in args.also:  # the same variants with another Triton, in its own environment
        command = [python, __file__, "--arch", args.arch, "--hidden", *map(str, args.hidden)]
        command += (["--no-assemble"] if args.no_assemble else []) + (["--out", args.out] if args.out else [])
        failed += subprocess.run(command).returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
