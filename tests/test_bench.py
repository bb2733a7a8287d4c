"""The throughput benchmark runs and writes the JSON lines the README quotes (no timing asserted:
speed is judged from its output, not here)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.mark.parametrize("mode", [[], ["--kernel-calls", "--layer-norm"]], ids=["paths", "kernel-calls"])
def test_cpu_window_bench_prints_its_line(mode):
    from hmrnn_lightning.engine import cpu_fused

    if cpu_fused.kernels() is None:
        pytest.skip("no C++ compiler to build the fused kernels")
    proc = subprocess.run(
        [sys.executable, str(BENCH.parent / "cpu_window.py"), "--hidden", "8", "--batch", "2", "--length", "5",
         "--repeats", "1", *mode], capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    if mode:
        assert "forward: 15 calls" in proc.stdout and "backward: 15 calls" in proc.stdout  # 3 layers x 5 steps
    else:
        assert "fused [" in proc.stdout and "PyTorch loop [" in proc.stdout


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
    assert len(rows) == 24 and all(r["ptx_chars"] > 0 and "error" not in r for r in rows)


@pytest.mark.slow
def test_gpu_smoke_script_end_to_end_on_the_cpu(tmp_path):
    """bench/gpu_smoke.sh at its tiny shape on the CPU, the Triton kernels under the interpreter:
    every stage runs and reports, the accuracy checks pass, and the tables are written."""
    script = BENCH.parent / "gpu_smoke.sh"
    env = {**os.environ, "SMOKE_TINY": "1", "OUT": str(tmp_path), "PYTHON": sys.executable,
           "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=1800, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "smoke.jsonl").read_text().splitlines()]
    stages = {r["stage"] for r in rows}
    assert stages == {"accuracy", "graph", "times", "profile"}
    accuracy = [r for r in rows if r["stage"] == "accuracy"]
    assert {(r["impl"], r["layer_norm"]) for r in accuracy} == {(i, ln) for i in ("triton", "sequence") for ln in (False, True)}
    assert all(r["ok"] and r["boundary_agreement"] == 1.0 for r in accuracy)
    assert {r["precision"] for r in rows if r["stage"] == "times"} == {"fp32", "tf32", "bf16"}
    summary = (tmp_path / "summary.txt").read_text()
    assert summary.count("exit 0") == 7, summary
    bench_rows = [json.loads(line) for line in (tmp_path / "throughput.jsonl").read_text().splitlines()]
    assert len(bench_rows) == 8 and {r["impl"] for r in bench_rows} == {"lstm", "hm_sequence"}


def test_gpu_smoke_accuracy_check_fails_on_a_wrong_path(monkeypatch, capsys):
    """The smoke script's accuracy verdict can fail: a fast path whose gradients are 1% off is
    reported with ok false and exit status 1."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_smoke", BENCH.parent / "gpu_smoke.py")
    smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke)
    honest = smoke.forward_backward

    def off_by_one_percent(stack, x, probe, dtype):
        loss, z, grads = honest(stack, x, probe, dtype)
        if getattr(stack, "impl", "reference") != "reference":
            grads = {k: g * 1.01 for k, g in grads.items()}
        return loss, z, grads

    monkeypatch.setattr(smoke, "forward_backward", off_by_one_percent)
    assert smoke.main(["accuracy", "--tiny", "--device", "cpu"]) == 1
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert rows and not any(r["ok"] for r in rows)


def test_gradient_growth_prints_every_regime_for_a_small_model(tmp_path):
    """``bench/gradient_growth.py`` on a small generated text: one Markdown row per (seed, placement,
    regime), each with a finite norm per length, the below-only start among the regimes."""
    text = tmp_path / "text.txt"
    text.write_text("the cat sat on the mat and the dog ran after it " * 40)
    out = tmp_path / "growth.jsonl"
    proc = subprocess.run(
        [sys.executable, str(BENCH.with_name("gradient_growth.py")), "--text", str(text), "--hidden", "8", "--emb", "4",
         "--batch", "4", "--lengths", "5", "10", "--placements", "bottom", "--seeds", "0", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=1800,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    regimes = ["step a=1", "step a=5", "a=1 no flush grad", "a=1 below-only init", "all FLUSH"]
    assert sorted({r["regime"] for r in rows}) == sorted(regimes) and len(rows) == 2 * len(regimes) * 2
    assert all(r["grad_norm"] > 0 and r["grad_norm"] < float("inf") for r in rows)
    assert "| 1 | bottom | a=1 below-only init |" in proc.stdout
