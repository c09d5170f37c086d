#!/usr/bin/env bash
# Everything only a GPU can tell, in one call, in under 10 minutes, on a machine with torch and triton
# but no network:
#   1. the kernel tests on the device (every op compiled by Triton for this GPU and checked against
#      its reference), the model tests (parity with transformers, through the CUDA kernels);
#   2. the kernel microbenchmarks;
#   3. the end-to-end comparison against the reference recipe (both stages, 7B shape) and evaluation
#      throughput against transformers' generate (7B shape);
#   4. the memory plan's fake-tensor estimate against torch.cuda.max_memory_allocated of the same step;
# and a markdown summary with date, device and versions, ready to paste into benchmarks/RESULTS.md.
#
#   bash benchmarks/gpu_suite.sh            # writes $OUT/gpu_suite.md (OUT defaults to benchmarks/out)
#   E2E_LAYERS=8 bash benchmarks/gpu_suite.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
SUMMARY="$OUT/gpu_suite.md"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

python - <<'EOF' || { echo "no CUDA device: this suite needs a GPU" >&2; exit 2; }
import torch, sys
sys.exit(0 if torch.cuda.is_available() else 1)
EOF
# fastllava's configuration needs omegaconf (pure Python, needs only PyYAML), which the lent GPU machine
# lacks: carry its wheel (pip download --no-deps omegaconf==2.4.0 -d .whl) and pip install it first.
python -c "import omegaconf" || { echo "omegaconf is not installed: pip install 'omegaconf>=2.4' (or carry its wheel)" >&2; exit 2; }

# The packing planner's C++ core; without network, so no build isolation. The Python reference is
# the fallback if this fails (plans are identical, only slower).
python setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || echo "csrc build failed (see $OUT/build.log); using the Python planner"

versions=$(python -c "import torch, triton, transformers; print(f'torch {torch.__version__}, triton {triton.__version__}, transformers {transformers.__version__}, CUDA {torch.version.cuda}')")
device=$(python -c "import torch; print(torch.cuda.get_device_name())")
{
  echo "## $(date -u +%Y-%m-%d) — $device"
  echo
  echo "Versions: $versions. Command: \`bash benchmarks/gpu_suite.sh\` (commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown))."
  echo
} > "$SUMMARY"

status=0
step() {  # step NAME TIMEOUT_S COMMAND...: run, keep the log, put its tail in the summary
  local name=$1 limit=$2; shift 2
  local log="$OUT/$name.log" start=$SECONDS
  timeout "$limit" "$@" > "$log" 2>&1
  local rc=$?
  [ $rc -ne 0 ] && status=1
  {
    echo "### $name (exit $rc, $((SECONDS - start)) s)"
    echo
    echo '```'
    grep -E '^\|' "$log" | tail -n 60 || true
    tail -n 3 "$log"
    echo '```'
    echo
  } >> "$SUMMARY"
}

step tests 240 python -m pytest -q -x tests/ops tests/model tests/generate -m "not slow" -p no:cacheprovider
step bench_attention 150 python -m pytest benchmarks/bench_attention.py --benchmark-only -q -k "7b or (gqa-28x4 and mix665k)" --benchmark-json "$OUT/bench_attention.json"
step bench_projector 45 python -m pytest benchmarks/bench_projector.py --benchmark-only -q -k "not compile or 16img-4096" --benchmark-json "$OUT/bench_projector.json"
step bench_merge 30 python -m pytest benchmarks/bench_merge.py --benchmark-only -q -k "not compile" --benchmark-json "$OUT/bench_merge.json"
step bench_flce 90 python -m pytest benchmarks/bench_flce.py --benchmark-only -q -k "not compile or 16k" --benchmark-json "$OUT/bench_flce.json"
step bench_decode_attention 60 python -m pytest benchmarks/bench_decode_attention.py --benchmark-only -q --benchmark-json "$OUT/bench_decode_attention.json"
step e2e 150 python benchmarks/e2e.py --shape 7b --layers "${E2E_LAYERS:-4}" --json "$OUT/e2e.json"
step bench_memory 120 python benchmarks/bench_memory.py --shape 7b --layers 4 --stages finetune --pack-tokens 8192 --json "$OUT/bench_memory.json"
step bench_generate 150 python benchmarks/bench_generate.py --shape 7b --layers 8 --json "$OUT/bench_generate.json"
[ -f "$OUT/e2e.json" ] && step plan 30 python -m fastllava.plan --recipe llava-1.5-7b --gpus 8 --gpu A100-80G --measured "$OUT/e2e.json"

cat "$SUMMARY"
exit $status
