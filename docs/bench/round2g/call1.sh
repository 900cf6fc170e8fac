#!/usr/bin/env bash
# Session 18, call 1 (nvidia-h200-x2), issue 17: four small changes A/B'd against .gpu/base (958d363):
# kern = offset in the NF4 kernels + rows read in place (cb303cb); sums = + compiled token sums (b80a94c);
# new = + compiled softmax of the frozen head (44a8a9d). Each GPU runs all four trees, in opposite orders.
# Then: per-kernel times of base and new (expert_kernels.py --tree), and the GPU tests the changes touch.
source bench/gpu_session.sh || exit 1
T0=$(date +%s)
run() {  # tree label
  timeout 170 python3 $1/bench/bench.py --checkpoint $CKPT --seqs 2048,4096 --quick --graphs --steps 8 \
    --kept-blocks 0,24 --out $OUT/bench_$2_$CUDA_VISIBLE_DEVICES.json > $OUT/bench_$2_$CUDA_VISIBLE_DEVICES.log 2>&1
  echo "bench $2 gpu $CUDA_VISIBLE_DEVICES rc=$? t=$(( $(date +%s) - T0 ))"
  grep -E '"seq"' $OUT/bench_$2_$CUDA_VISIBLE_DEVICES.log | cut -c1-200
}
( export CUDA_VISIBLE_DEVICES=0; run .gpu/base base; run .gpu/kern kern; run .gpu/sums sums; run . new
  timeout 100 python3 bench/expert_kernels.py --rows 8192,16384 --tree .gpu/base > $OUT/kernels_base.log 2>&1
  echo "kernels base rc=$?"; timeout 100 python3 bench/expert_kernels.py --rows 8192,16384 > $OUT/kernels_new.log 2>&1
  echo "kernels new rc=$? t=$(( $(date +%s) - T0 ))"
) > $OUT/gpu0.txt 2>&1 &
( export CUDA_VISIBLE_DEVICES=1; run . new; run .gpu/sums sums; run .gpu/kern kern; run .gpu/base base
  timeout 330 python3 -m pytest -m gpu tests/test_gpu.py tests/test_mxfp4.py -p no:cacheprovider -rA \
    > $OUT/gpu_tests.log 2>&1
  echo "gpu tests rc=$? t=$(( $(date +%s) - T0 ))"; grep -E "^(PASSED|FAILED|ERROR)|passed|failed" $OUT/gpu_tests.log
) > $OUT/gpu1.txt 2>&1 &
wait
cat $OUT/gpu0.txt; echo ======; cat $OUT/gpu1.txt
cd $OUT && tar czf results.tgz --exclude results.tgz * && ls | grep -v -e results.tgz -e gpu0.txt -e gpu1.txt | xargs rm -f
