#!/usr/bin/env bash
# Session 17, call 4 (nvidia-h200-x2), issue 17. GPU 0: the step's profile at 2,048 tokens with all 24 blocks
# kept (eager). GPU 1: bench.py --base mxfp4 kept 0 / 24; flex attention's kernel options (one-off).
source bench/gpu_session.sh || exit 1
T0=$(date +%s)
(
  export CUDA_VISIBLE_DEVICES=0
  timeout 200 python3 bench/profile_step.py --checkpoint $CKPT --seq 2048 --kernels 70 --kept-blocks 24 \
    > $OUT/profile_2048_kept24.log 2>&1
  echo "profile rc=$? t=$(( $(date +%s) - T0 ))"; grep -E '^seq|^\{"seq' $OUT/profile_2048_kept24.log
) > $OUT/gpu0.txt 2>&1 &
(
  export CUDA_VISIBLE_DEVICES=1
  timeout 150 python3 bench/bench.py --checkpoint $CKPT --seqs 2048,4096 --quick --graphs --steps 8 --base mxfp4 \
    --kept-blocks 0,24 --out $OUT/bench_mxfp4.json > $OUT/bench_mxfp4.log 2>&1
  echo "bench mxfp4 rc=$? t=$(( $(date +%s) - T0 ))"; grep -E '"seq"' $OUT/bench_mxfp4.log | cut -c1-220
  timeout 200 python3 .gpu/flex_options.py > $OUT/flex_options.jsonl 2>&1
  echo "flex rc=$? t=$(( $(date +%s) - T0 ))"; grep -E '^\{' $OUT/flex_options.jsonl | cut -c1-330
) > $OUT/gpu1.txt 2>&1 &
wait
cat $OUT/gpu0.txt; echo ======; cat $OUT/gpu1.txt
cd $OUT && tar czf results.tgz --exclude results.tgz * && ls | grep -v -e results.tgz -e gpu0.txt -e gpu1.txt | xargs rm -f
