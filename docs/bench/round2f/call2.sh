#!/usr/bin/env bash
# Session 17, call 2 (nvidia-h200-x2), issue 17. .gpu/base: the tree of 50cb635 (kept blocks, the old MLP
# backward tiles). GPU 0: bench base vs new (kept 0; new also 24), the reference; train.py at 2,048 tokens
# on the 16 GB card (cap 15.58), the plan's kept blocks against none, an evaluation every 10 steps.
# GPU 1: the same at 4,096 tokens on a 24 GB card (cap 22.5); the GPU tests of the expert layers.
source bench/gpu_session.sh || exit 1
T0=$(date +%s)
(
  export CUDA_VISIBLE_DEVICES=0
  timeout 120 python3 .gpu/base/bench/bench.py --checkpoint $CKPT --seqs 2048,4096 --quick --graphs --steps 8 \
    --out $OUT/bench_base.json > $OUT/bench_base.log 2>&1
  echo "bench base rc=$? t=$(( $(date +%s) - T0 ))"; grep -E '"seq"' $OUT/bench_base.log | cut -c1-220
  timeout 160 python3 bench/bench.py --checkpoint $CKPT --seqs 2048,4096 --quick --graphs --steps 8 \
    --kept-blocks 0,24 --out $OUT/bench_new.json > $OUT/bench_new.log 2>&1
  echo "bench new rc=$? t=$(( $(date +%s) - T0 ))"; grep -E '"seq"' $OUT/bench_new.log | cut -c1-220
  (cd bench && SEQS=2048,4096 STEPS=5 OUT=$OUT timeout 100 python3 hf_peft_baseline.py > $OUT/hf_peft.log 2>&1)
  echo "hf rc=$? t=$(( $(date +%s) - T0 ))"; grep '^{"seq"' $OUT/hf_peft.log
  for kept in auto 0; do
    flag=$([[ $kept == auto ]] || echo "--kept-blocks $kept")
    timeout 150 bash bench/user_run.sh u2048_kept_$kept --max-seq-len 2048 --max-steps 20 --eval-every 10 $flag
    echo "t=$(( $(date +%s) - T0 ))"
  done
) > $OUT/gpu0.txt 2>&1 &
(
  export CUDA_VISIBLE_DEVICES=1
  for kept in auto 0; do
    flag=$([[ $kept == auto ]] || echo "--kept-blocks $kept")
    CAP=22.5 timeout 160 bash bench/user_run.sh u4096_cap22_kept_$kept --max-steps 20 --eval-every 10 $flag
    echo "t=$(( $(date +%s) - T0 ))"
  done
  timeout 200 python3 -m pytest -m gpu tests/test_gpu.py tests/test_mxfp4.py -p no:cacheprovider -rA \
    -k "experts_equal or layer or reproducib or padding" > $OUT/gpu_tests.log 2>&1
  echo "gpu tests rc=$? t=$(( $(date +%s) - T0 ))"; grep -E "^(PASSED|FAILED|ERROR)|passed|failed" $OUT/gpu_tests.log
) > $OUT/gpu1.txt 2>&1 &
wait
cat $OUT/gpu0.txt; echo ======; cat $OUT/gpu1.txt
cd $OUT && tar czf results.tgz --exclude results.tgz * && ls | grep -v -e results.tgz -e gpu0.txt -e gpu1.txt | xargs rm -f
