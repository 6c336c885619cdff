#!/usr/bin/env bash
# The whole GPU check in one go (<= 8 minutes on one H100/H200): the CUDA tests, CPT step time at the
# mid size and at a ~0.5B-parameter config in bf16, sdpa vs flex (MFU against the measured bf16
# matmul peak; bench_train.py itself is CPU-only: fp32, RSS-based memory),
# bench_attention, decode tokens/s cached vs uncached, FP4 quantizer GB/s vs copy bandwidth,
# UFP4Linear vs bf16 nn.Linear, with the peak memory of each.
#
# Results (JSON + markdown per step, logs, and gpu_check.json with every step's status) go to $OUT
# when set, else benchmarks/results/. A failing or timed-out step is recorded and the next one runs.
#   bash benchmarks/gpu_check.sh                 # on the GPU machine
#   GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh # every step at tiny sizes on CPU (results to a scratch
#                                                # dir unless $OUT is set), so no line is untried
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
DRY=${GPU_CHECK_DRY:-0}
if [ -n "${OUT:-}" ]; then RES=$OUT
elif [ "$DRY" = 1 ]; then RES=$(mktemp -d /tmp/gpu_check_dry.XXXXXX)
else RES=benchmarks/results
fi
mkdir -p "$RES"
export LLADA_BENCH_RESULTS=$RES
STATUS=$RES/gpu_check_status.jsonl
: > "$STATUS"
if [ "$DRY" = 1 ]; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  "$PY" -c 'import torch, sys; sys.exit(torch.cuda.is_available())' && export TRITON_INTERPRET=1
fi
echo "[gpu_check] results in $RES (dry=$DRY)"

# step NAME RESULT_STEM GPU_SECONDS DRY_SECONDS COMMAND...: run with a timeout, append a status line
step() {
  local name=$1 result=$2 limit=$3
  [ "$DRY" = 1 ] && limit=$4
  shift 4
  local log=$RES/$name.log start end rc
  start=$(date +%s.%N)
  timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1
  rc=$?
  end=$(date +%s.%N)
  python3 - "$STATUS" "$name" "$result" "$rc" "$start" "$end" "$limit" "$log" <<'EOF'
import json, sys
status, name, result, rc, start, end, limit, log = sys.argv[1:]
tail = open(log, errors="replace").read()[-3000:]
line = {"name": name, "result": result or None, "rc": int(rc), "seconds": round(float(end) - float(start), 1),
        "timed_out": int(rc) in (124, 137), "timeout_s": int(limit), "log": log, "log_tail": tail}
open(status, "a").write(json.dumps(line) + "\n")
print(f"[gpu_check] {name}: rc={rc} in {line['seconds']}s (limit {limit}s)", flush=True)
EOF
}

if [ "$DRY" = 1 ]; then
  ATTN_ARGS=(--sizes 256 --heads 2 --head-dim 32 --repeats 1 --warmup 0)
  DRY_FLAG=(--dry)
else
  ATTN_ARGS=(--sizes 1024,2048,4096)
  DRY_FLAG=()
fi

step gpu_tests "" 140 60 "$PY" -m pytest -q -rA tests/test_gpu.py --junitxml="$RES/gpu_tests.xml"
step train gpu_check_train 150 60 "$PY" benchmarks/gpu_check_steps.py train "${DRY_FLAG[@]}"
step bench_attention bench_attention 60 60 "$PY" benchmarks/bench_attention.py "${ATTN_ARGS[@]}"
step decode gpu_check_decode 50 60 "$PY" benchmarks/gpu_check_steps.py decode "${DRY_FLAG[@]}"
step fp4 gpu_check_fp4 30 60 "$PY" benchmarks/gpu_check_steps.py fp4 "${DRY_FLAG[@]}"
step ufp4_linear gpu_check_ufp4_linear 30 60 "$PY" benchmarks/gpu_check_steps.py ufp4-linear "${DRY_FLAG[@]}"
"$PY" benchmarks/gpu_check_steps.py merge --status "$STATUS"
