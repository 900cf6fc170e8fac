#!/usr/bin/env bash
# Session 19, call 7 (nvidia-h200-x2): the GPU tests the dense path touches, on the final code.
source bench/gpu_session.sh || exit 1
T0=$(date +%s)
timeout 200 python3 -m pytest -m gpu tests/test_gpu.py -p no:cacheprovider -q \
  -k "dense or lora_on_the_nf4 or padding_gets or bit_reproducible or kept_blocks or nf4_experts_equal" > $OUT/gpu_tests.log 2>&1
echo "gpu tests rc=$? t=$(( $(date +%s) - T0 ))"; grep -E "passed|failed|Error" $OUT/gpu_tests.log | tail -5
grep -B5 -A30 "Error\|FAILED" $OUT/gpu_tests.log | head -60
