#!/usr/bin/env bash
# Session 21, call 6 (nvidia-h200-x2), issue 17: each graphed step's time over 30 steps (bench.py's step_ms),
# dense path, 2,048 and 4,096 tokens: GPU 0 the same tokens every step (as every figure before), GPU 1 new
# random tokens each step (--fresh-ids). Call 5's 30-step run gave 13,607 tokens/s where 8-step runs give ~12,850.
source bench/gpu_session.sh || exit 1
T0=$(date +%s)
run() {  # label extra-args...
  local label=$1; shift
  timeout 150 python3 bench/bench.py --checkpoint $CKPT --seqs 2048,4096 --graphs --steps 30 --dense-experts 1 \
     --out $OUT/$label.json "$@" > $OUT/$label.log 2>&1
  echo "$label rc=$? t=$(( $(date +%s) - T0 ))"; grep -E '"seq"' $OUT/$label.log
}
( export CUDA_VISIBLE_DEVICES=0; run same_ids_gpu0 ) > $OUT/gpu0.txt 2>&1 &
P0=$!
( export CUDA_VISIBLE_DEVICES=1; run fresh_ids_gpu1 --fresh-ids ) > $OUT/gpu1.txt 2>&1 &
P1=$!
wait $P0 $P1
cat $OUT/gpu0.txt; echo ======; cat $OUT/gpu1.txt
cd $OUT && tar czf results.tgz --exclude results.tgz * && ls | grep -v -e results.tgz -e gpu0.txt -e gpu1.txt | xargs rm -f
