#!/usr/bin/env bash
# Every GPU question in one device call of at most 8 minutes, each stage under its own timeout,
# each writing its results as it goes (a stage that times out leaves what it finished):
#
#   1. accuracy  Triton and sequence paths at 3 x 512 against the fp64 reference (LN off/on)  <= 90 s
#   2. graph     CUDA graph against eager over three windows, gradients accumulated          <= 45 s
#   3. times     stack-only window fwd+bwd: eager/graph x fp32/TF32/bf16 beside cuDNN, peak MB <= 100 s
#   4. profile   kernels per window, GPU-busy time against wall time (bf16)                    <= 45 s
#   5. bench     bench/throughput.py: PTB bf16, PTB fp32 strict and TF32, Text8 bf16        <= 4 x 45 s
#
# From the repository root, with the device tool:
#   run(command="bash bench/gpu_smoke.sh", timeout_s=540)
# Results land in $OUT (the device tool's folder; bench/results/gpu-smoke-<date>/ without it):
# gpu.txt, smoke.jsonl (stages 1-4), throughput.jsonl and throughput.md (stage 5), summary.txt.
# The exit status is 1 when any stage reported a failed check or did not finish.
#
# SMOKE_TINY=1 runs every stage at a tiny shape on whatever device there is (the test suite runs
# it on the CPU under TRITON_INTERPRET=1, so this script cannot rot unnoticed).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu-smoke-$(date +%F)}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if [ "${SMOKE_TINY:-0}" = 1 ]; then
  tiny=(--tiny --repeats 1); shape_ptb=tiny; shape_text8=tiny; bench_steps=(--steps 1 --warmup 0); t=1
else
  tiny=(); shape_ptb=ptb; shape_text8=text8; bench_steps=(--steps 10 --warmup 3); t=0
fi
device=$($PY -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
{
  date -u +%FT%TZ
  if [ "$device" = cuda ]; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; fi
  $PY -c "import torch; print('torch', torch.__version__)"
  $PY -c "import triton; print('triton', triton.__version__)" 2>/dev/null || echo "triton: not installed"
} > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

status=0
stage() {  # stage NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@"
  local rc=$?
  echo "$name: exit $rc in $((SECONDS - start)) s (limit $limit s)" | tee -a "$OUT/summary.txt"
  [ $rc -eq 0 ] || status=1
}

for s in accuracy graph times profile; do
  case $s in accuracy) limit=90 ;; times) limit=100 ;; *) limit=45 ;; esac
  [ $t = 1 ] && limit=$((limit * 6))  # the interpreter is slow; the tiny shape keeps it to seconds
  stage "$s" "$limit" $PY bench/gpu_smoke.py "$s" --device "$device" "${tiny[@]}" --out "$OUT/smoke.jsonl"
done
bench() {  # bench NAME SHAPE PRECISION...
  local name=$1 shape=$2; shift 2
  local impls=(lstm hm_triton hm_triton_graph)
  [ "$device" = cuda ] || impls=(lstm hm_sequence)  # the interpreter would take minutes; the plumbing is the same
  stage "bench $name" $((t == 1 ? 300 : 45 * $#)) $PY bench/throughput.py --device "$device" \
    --shapes "$shape" --layer-norm --precision "$@" --impls "${impls[@]}" "${bench_steps[@]}" \
    --out "$OUT/throughput.jsonl" >> "$OUT/throughput.md"
}
bench "ptb bf16" "$shape_ptb" bf16
bench "ptb fp32 strict and tf32" "$shape_ptb" fp32 tf32
bench "text8 bf16" "$shape_text8" bf16
if grep -q '"ok": false' "$OUT/smoke.jsonl" 2>/dev/null; then
  echo "failed checks:" | tee -a "$OUT/summary.txt"
  grep '"ok": false' "$OUT/smoke.jsonl" | tee -a "$OUT/summary.txt"
  status=1
fi
cat "$OUT/throughput.md" 2>/dev/null
exit $status
