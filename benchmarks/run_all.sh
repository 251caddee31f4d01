#!/usr/bin/env bash
# Every benchmark of the README, each writing its table to benchmarks/results/<name>.md.
# About 40 minutes on a quiet 2-core machine; run it on a quiet one (the timings are ratios
# measured in one run, but OpenMP threads that wait on a busy neighbour distort them).
#   ./benchmarks/run_all.sh                 # all
#   ./benchmarks/run_all.sh blocks scores   # some
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
out=benchmarks/results
mkdir -p "$out"
names=("$@")
[ ${#names[@]} -eq 0 ] && names=(blocks kernels optimizer kept_buffers heap scale chunk_sizes ddp export scores validation kill_loop)
for name in "${names[@]}"; do
  echo "[bench] $name"
  case $name in
    blocks) "$PY" benchmarks/blocks.py ;;
    kernels) "$PY" benchmarks/kernels.py --output /dev/null | sed '$d' ;;  # drop its "written to" line
    optimizer) "$PY" benchmarks/optimizer.py --output /dev/null | sed '$d' ;;
    kept_buffers) "$PY" benchmarks/kept_buffers.py --output /dev/null | sed '$d' ;;
    heap) "$PY" benchmarks/heap.py --output /dev/null | sed '$d' ;;
    scale) "$PY" benchmarks/scale.py --omp-wait-policy default --plot "$out/scale.png" ;;
    chunk_sizes) "$PY" benchmarks/scale.py --rows chunks --omp-wait-policy default ;;
    ddp) OMP_NUM_THREADS=1 "$PY" benchmarks/ddp.py ;;
    export) "$PY" benchmarks/export.py --threads 2 ;;
    scores) "$PY" benchmarks/scores.py ;;
    validation) "$PY" benchmarks/validation.py ;;
    kill_loop) "$PY" benchmarks/kill_loop.py ;;
    *) echo "unknown benchmark: $name" >&2; exit 2 ;;
  esac > "$out/$name.md"
done
