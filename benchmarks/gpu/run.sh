#!/usr/bin/env bash
# arraymlp's GPU check: environment, offline install, then benchmarks/gpu/check.py under
# one budget. From the repository root, on a CUDA machine:
#
#     bash benchmarks/gpu/run.sh                 # results into benchmarks/results/
#     OUT=/some/dir bash benchmarks/gpu/run.sh   # results (and the log) into OUT as well
#
# Wheels for array-api-compat / array-api-strict (absent on a machine without network) are
# taken from WHEELS_DIR, .gpu/whl or benchmarks/gpu/whl when the modules are missing.
# The whole run stays under GPU_CHECK_BUDGET seconds (default 375, about 6 minutes with
# the install), every section of check.py under its own cap (check.py's CAPS, 345 s in all).
set -u -o pipefail
START=$SECONDS
BUDGET=${GPU_CHECK_BUDGET:-375}
PY=${PY:-python3}
RESULTS=${RESULTS:-benchmarks/results}
mkdir -p "$RESULTS"
LOG=$RESULTS/gpu-check.log
: > "$LOG"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
export CUPY_CACHE_DIR=${CUPY_CACHE_DIR:-/tmp/cupy_kernel_cache}

{
  date -u; uname -a
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  "$PY" -V
  # a warning at import would make the test rows of CuPy skip as "no GPU": show it here
  "$PY" -W error -c "import cupy; print('cupy', cupy.__version__, cupy.cuda.runtime.getDeviceCount(), 'devices')" || true
  "$PY" -W error -c "import torch; print('torch', torch.__version__, torch.version.cuda, torch.cuda.is_available())" || true
} 2>&1 | tee -a "$LOG"

if ! "$PY" -c "import array_api_compat, array_api_strict" >/dev/null 2>&1; then
  for d in "${WHEELS_DIR:-}" .gpu/whl benchmarks/gpu/whl; do
    if [[ -n $d ]] && ls "$d"/array_api_*.whl >/dev/null 2>&1; then
      timeout 60 "$PY" -m pip install -q --no-index --no-deps --target /tmp/arraymlp-site "$d"/array_api_*.whl \
        >> "$LOG" 2>&1 && export PYTHONPATH=/tmp/arraymlp-site${PYTHONPATH:+:$PYTHONPATH}
      break
    fi
  done
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
"$PY" -c "import arraymlp; print('arraymlp', arraymlp.__version__, arraymlp.__file__)" 2>&1 | tee -a "$LOG"

LEFT=$((BUDGET - (SECONDS - START) - 10))
timeout -s INT -k 20 "$((LEFT + 15))" "$PY" benchmarks/gpu/check.py --out "$RESULTS" --budget "$LEFT" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
if [[ -n ${OUT:-} && -d ${OUT:-} ]]; then
  cp "$RESULTS"/*gpu-check* "$RESULTS"/*-bench.json "$RESULTS"/*-W5.png "$RESULTS"/*-ensemble.png \
     "$RESULTS"/*-junit.xml "$OUT"/ 2>/dev/null
fi
echo "gpu check: rc=$rc, $((SECONDS - START)) s" | tee -a "$LOG"
exit "$rc"
