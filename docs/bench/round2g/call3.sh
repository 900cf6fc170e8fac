#!/usr/bin/env bash
# Session 18, call 3 (nvidia-h200-x2), issue 17: two more changes A/B'd. rot = the rotary kernel (6c69977)
# against mid (52e3505, call 2's final code): attention-only, kept 0 / 24, each GPU both trees in opposite
# orders. new = rot + expert LoRA's term in the kernels' epilogue (b2aa8e1) against rot: expert LoRA,
# kept 0, both orders on GPU 0. Then the GPU tests the two changes touch.
source bench/gpu_session.sh || exit 1
T0=$(date +%s)
run() {  # tree label [extra flags]
  local tree=$1 label=$2; shift 2
  timeout 140 python3 $tree/bench/bench.py --checkpoint $CKPT --seqs 2048,4096 --quick --graphs --steps 8 \
    --out $OUT/bench_${label}_$CUDA_VISIBLE_DEVICES.json "$@" > $OUT/bench_${label}_$CUDA_VISIBLE_DEVICES.log 2>&1
  echo "bench $label gpu $CUDA_VISIBLE_DEVICES rc=$? t=$(( $(date +%s) - T0 ))"
  grep -E '"seq"' $OUT/bench_${label}_$CUDA_VISIBLE_DEVICES.log | cut -c1-200
}
E=q_proj,k_proj,v_proj,o_proj,experts
( export CUDA_VISIBLE_DEVICES=0
  run .gpu/mid mid --kept-blocks 0,24; run .gpu/rot rot --kept-blocks 0,24
  run . experts_new --kept-blocks 0 --targets $E; run .gpu/rot experts_rot --kept-blocks 0 --targets $E
) > $OUT/gpu0.txt 2>&1 &
( export CUDA_VISIBLE_DEVICES=1
  run .gpu/rot rot --kept-blocks 0,24; run .gpu/mid mid --kept-blocks 0,24
  timeout 170 python3 -m pytest -m gpu tests/test_gpu.py tests/test_mxfp4.py -p no:cacheprovider -rA \
    -k "compiled or equal_dense or identical or lora_on_the_nf4" > $OUT/gpu_tests.log 2>&1
  echo "gpu tests rc=$? t=$(( $(date +%s) - T0 ))"; grep -E "^(PASSED|FAILED|ERROR)|passed|failed" $OUT/gpu_tests.log
) > $OUT/gpu1.txt 2>&1 &
wait
cat $OUT/gpu0.txt; echo ======; cat $OUT/gpu1.txt
cd $OUT && tar czf results.tgz --exclude results.tgz * && ls | grep -v -e results.tgz -e gpu0.txt -e gpu1.txt | xargs rm -f
