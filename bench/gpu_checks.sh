#!/usr/bin/env bash
# Every GPU check of the Triton path, for a session that has a GPU for a short while.
#
#   bash bench/gpu_checks.sh tests         # CUDA tests: triton and sequence paths vs the reference (fp32, bf16)
#   bash bench/gpu_checks.sh bench ptb     # throughput: nn.LSTM, hm_triton, hm_triton_graph; LN off/on; fp32/bf16
#   bash bench/gpu_checks.sh bench text8
#   bash bench/gpu_checks.sh profile       # where the time goes: torch.profiler tables, PTB shape
#   bash bench/gpu_checks.sh train         # the main job for 3.5 minutes, bf16, CUDA graphs off then on
#   bash bench/gpu_checks.sh all           # tests, bench and profile (about 15-25 minutes on an H100)
#
# `train` runs `hmrnn fit`, which needs jsonargparse (absent from the GPU image) and the PTB files
# (../shared does not travel). From the repository root, once:
#   printf '/.whl/\n/.gpu-data/\n' >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl jsonargparse==4.53.0 docstring_parser==0.18.0 typeshed_client==2.14.0
#   mkdir -p .gpu-data/ptb && cp ../shared/data/ptb/ptb.char.*.txt .gpu-data/ptb/
# and name `.whl` and `.gpu-data` in the device call's `carry`.
#
# Each stage fits in one 10-minute device call. Results go to $OUT (the device tool's folder) or
# to bench/results/gpu-<date>/: gpu.txt (machine), cuda_tests.log, throughput.jsonl (one JSON line
# per measurement, ratios against nn.LSTM measured in the same process group), throughput.md
# (the Markdown tables), profile-*.txt. Runs from the repository root with the machine's own
# python3 (torch and Triton installed); the package is taken from src/ without installing it.
set -u
stage=${1:-all}
only_shape=${2:-}
OUT=${OUT:-bench/results/gpu-$(date +%F)}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} > "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"

run_tests() {
  HMRNN_TEST_CUDA=1 timeout 540 python3 -m pytest -q -p no:cacheprovider \
    tests/engine/test_triton_window.py tests/engine/test_fast_paths.py -k "cuda or triton" 2>&1 | tee "$OUT/cuda_tests.log"
}

run_bench() {
  local shapes=${only_shape:-ptb text8}
  for shape in $shapes; do
    for ln in "" "--layer-norm"; do
      for precision in fp32 bf16; do
        echo "== $shape ${ln:-plain} $precision"
        timeout 300 python3 bench/throughput.py --device cuda --shapes "$shape" $ln --precision "$precision" \
          --impls lstm hm_triton hm_triton_graph --steps 10 --warmup 3 --out "$OUT/throughput.jsonl" \
          | tee -a "$OUT/throughput.md"
      done
    done
  done
}

run_profile() {
  for impl in hm_triton hm_triton_graph lstm; do
    timeout 200 python3 bench/throughput.py --device cuda --shapes ptb --impls "$impl" --steps 3 --warmup 3 \
      --profile "$OUT/profile-ptb-$impl.txt" | tee -a "$OUT/profile.jsonl"
  done
}

run_train() {
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH="/tmp/site:$PYTHONPATH"
  fi
  local data=${HMRNN_GPU_DATA:-.gpu-data/ptb}
  export HMRNN_CACHE_DIR=/tmp/hmrnn-cache
  for graph in false true; do
    timeout 290 python3 -m hmrnn_lightning.cli fit --config configs/ptb_step_anneal.yaml \
      --data.init_args.data_dir="$data" --trainer.max_time=00:00:03:30 --trainer.precision=bf16-mixed \
      --model.init_args.stack.init_args.cuda_graph=$graph --trainer.default_root_dir=/tmp/train-$graph \
      --trainer.logger=lightning.pytorch.loggers.CSVLogger --trainer.logger.init_args.save_dir=/tmp/train-$graph \
      > /tmp/train-$graph.log 2>&1
    echo "cuda_graph=$graph exit $?" | tee -a "$OUT/train-summary.txt"
    grep -a "hmrnn:" /tmp/train-$graph.log | tee -a "$OUT/train-summary.txt"
    tail -c 3000 /tmp/train-$graph.log | tr '\r' '\n' | tail -5 | tee -a "$OUT/train-summary.txt"
    find /tmp/train-$graph -name metrics.csv -exec cp {} "$OUT/train-graph-$graph-metrics.csv" \;
  done
}

case "$stage" in
  tests) run_tests ;;
  bench) run_bench ;;
  profile) run_profile ;;
  train) run_train ;;
  all) run_tests; run_bench; run_profile ;;
  *) echo "usage: bash bench/gpu_checks.sh tests|bench [ptb|text8]|profile|train|all" >&2; exit 2 ;;
esac
