"""The throughput benchmark runs and writes the JSON lines the README quotes (no timing asserted:
speed is judged from its output, not here)."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "throughput.py"


def test_bench_writes_one_json_line_per_impl(tmp_path):
    out = tmp_path / "bench.jsonl"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--device", "cpu", "--shapes", "tiny", "--impls", "lstm", "hm_sequence",
         "--steps", "1", "--warmup", "0", "--out", str(out)],
        capture_output=True, text=True, timeout=1800,  # a hang guard only; a loaded machine may be slow
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["impl"] for r in rows] == ["lstm", "hm_sequence"]
    for r in rows:
        assert {"impl", "shape", "device", "chars_per_s", "peak_mem_mb", "ratio_vs_lstm"} <= r.keys()
        assert r["chars_per_s"] > 0 and r["sample_chars_per_s"] > 0 and r["sample1_chars_per_s"] > 0
    assert rows[0]["ratio_vs_lstm"] == 1.0
    assert len(rows[1]["sample_boundary_rate"]) == 3 and rows[1]["sample_boundary_rate"][2] == 0.0  # top never fires
    assert "| hm_sequence | tiny | fp32 (strict, TF32 off) |" in proc.stdout  # the Markdown table, precision named
    assert all(r["precision"] == "fp32" for r in rows)


def test_kernels_compile_for_a_gpu_without_one():
    """The interpreter never meets Triton's compiler; this compiles every kernel variant the GPU
    path launches to PTX for an H100, in a subprocess without TRITON_INTERPRET."""
    import pytest

    pytest.importorskip("triton")
    script = BENCH.parent / "compile_kernels.py"
    proc = subprocess.run([sys.executable, str(script), "--hidden", "48", "--no-assemble"],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 18 and all(r["ptx_chars"] > 0 and "error" not in r for r in rows)
