#!/usr/bin/env bash
# Session 20, call 5 (nvidia-h200-x2), issue 17: A/B of NF4's one-kernel dequantisation with the scales
# decoded inside, now also for the attention's NF4 weights (R = c3330a6, bitsandbytes' two kernels for
# q/k/v/o and the scales decoded apart, against this tree), attention-only, dense path off/on, both GPUs
# in opposite orders; then on GPU 0 the GPU tests the change touches.
source bench/gpu_session.sh || exit 1
T0=$(date +%s)
run() {  # tree label extra-args...
  local tree=$1 label=$2; shift 2
  (cd $tree && timeout 110 python3 bench/bench.py --checkpoint $CKPT --seqs 2048,4096 --graphs --steps 8 --quick \
     --out $OUT/$label.json "$@" > $OUT/$label.log 2>&1)
  echo "$label rc=$? t=$(( $(date +%s) - T0 ))"; grep -E '"seq"' $OUT/$label.log | cut -c1-170
}
NEW=$PWD; R=$PWD/.gpu/treeR
( export CUDA_VISIBLE_DEVICES=0
  run $R attn_R_gpu0 --dense-experts 0,1; run $NEW attn_new_gpu0 --dense-experts 0,1
  timeout 150 python3 -m pytest -m gpu tests/test_gpu.py -k "attentions or dense or nf4_experts_equal or bit_reproducible or lora" -p no:cacheprovider > $OUT/gpu_tests.log 2>&1
  echo "gpu tests rc=$? t=$(( $(date +%s) - T0 ))"; tail -2 $OUT/gpu_tests.log; grep -E "FAILED|^E " $OUT/gpu_tests.log | head
) > $OUT/gpu0.txt 2>&1 &
( export CUDA_VISIBLE_DEVICES=1
  run $NEW attn_new_gpu1 --dense-experts 0,1; run $R attn_R_gpu1 --dense-experts 0,1
) > $OUT/gpu1.txt 2>&1 &
wait
cat $OUT/gpu0.txt; echo ======; cat $OUT/gpu1.txt
cd $OUT && tar czf results.tgz --exclude results.tgz * && ls | grep -v -e results.tgz -e gpu0.txt -e gpu1.txt | xargs rm -f
