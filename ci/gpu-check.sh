#!/usr/bin/env bash
# The GPU checks in one call, for a machine with an NVIDIA GPU and torch + triton installed (no nox,
# no network needed): run from the project root. Results go to $OUT (default gpu-check/):
#   tune/     benchmarks/tune_cuda.py: the launch table's candidates against the copy limit
#   bench/    python -m smoothce.bench --preset gpu-targets (with the peers when .peers/ was packed
#             by ci/gpu-peers.sh and carried along)
#   tests.log the CUDA test session (SMOOTHCE_TEST_DEVICE=cuda, pytest-xdist)
#   loops/    benchmarks/loops.py: the op eager and compiled (default, CUDA graphs), at dO = 1 and
#             under a loss scale, against the copy limit and torch.compile'd F.cross_entropy
#   linear/   the fused linear loss against eager, torch.compile and Liger, then smoothce alone with
#             a 1 GiB chunk and with d weight summed in bf16 (linear-1g/, linear-half/): the
#             fp32 accumulator's traffic against the chunk size (not in the default steps)
#   options/  the recipe options (soft-cap 30, z-loss 1e-4, class weights) against the plain loss
#             and PyTorch composing them, bf16 and fp32 at 8192 x 128256 (not in the default steps)
# STEPS chooses and orders the steps (default "tune bench loops tests"); each has its own time limit, and
# a step that fails or runs long does not stop the next.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD
if [ -f .peers/activate.sh ]; then
    bash .peers/activate.sh && source /tmp/peers.env
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
for step in ${STEPS:-tune bench loops tests}; do
    case $step in
        tune) timeout 150 python3 benchmarks/tune_cuda.py --out "$OUT/tune" 2>&1 | tee "$OUT/tune.log" ;;
        bench) timeout 240 python3 -m smoothce.bench --preset gpu-targets --time-limit 180 --no-plots \
                   --out "$OUT/bench" 2>&1 | tail -40 > "$OUT/bench.log" ;;
        loops) timeout 150 python3 benchmarks/loops.py --out "$OUT/loops" 2>&1 | tail -40 > "$OUT/loops.log" ;;
        tests) SMOOTHCE_TEST_DEVICE=cuda timeout 290 python3 -m pytest tests -q -p no:cacheprovider \
                   -p no:benchmark -n 14 --timeout 250 2>&1 | tail -80 > "$OUT/tests.log" ;;
        linear) timeout 200 python3 -m smoothce.bench --op linear --out "$OUT/linear" 2>&1 | tail -12 > "$OUT/linear.log"
                timeout 100 python3 -m smoothce.bench --op linear --no-compile --chunk-mib 1024 \
                    --out "$OUT/linear-1g" 2>&1 | tail -12 >> "$OUT/linear.log"
                timeout 100 python3 -m smoothce.bench --op linear --no-compile --half-weight-grad \
                    --out "$OUT/linear-half" 2>&1 | tail -12 >> "$OUT/linear.log" ;;
        options) timeout 120 python3 -m smoothce.bench --shapes 8192x128256 --modes fwd+bwd --no-plots \
                     --out "$OUT/plain" 2>&1 | tail -8 > "$OUT/options.log"
                 timeout 150 python3 -m smoothce.bench --shapes 8192x128256 --modes fwd+bwd --no-plots \
                     --softcap 30 --z-loss 1e-4 --class-weights --out "$OUT/options" 2>&1 | tail -8 >> "$OUT/options.log" ;;
        *) echo "unknown step $step (tune, bench, loops, tests, linear, options)" >&2 ;;
    esac
    echo "[$step done, status ${PIPESTATUS[0]}]" | tee -a "$OUT/steps.txt"
done
