#!/usr/bin/env bash
# Session 22, call 4 (nvidia-h200, one GPU, one process at a time), issue 17, the final code (3645b0c):
# the step's breakdown in the in-bound configuration (dense path, embedding on the CPU) at 2,048 and
# 4,096 tokens, and the bound a perfect 4-bit expert kernel could reach (.gpu/ideal_bound.py).
source bench/gpu_session.sh || exit 1
T0=$(date +%s)
timeout 150 python3 .gpu/ideal_bound.py > $OUT/ideal_bound.log 2>&1
echo "ideal rc=$? t=$(( $(date +%s) - T0 ))"; grep -E '^\{' $OUT/ideal_bound.log | cut -c1-200
for seq in 2048 4096; do
  timeout 120 python3 bench/profile_step.py --checkpoint $CKPT --seq $seq --kernels 40 --dense-experts \
    --embedding-device cpu > $OUT/profile_$seq.log 2>&1
  echo "profile $seq rc=$? t=$(( $(date +%s) - T0 ))"; grep -E '^\{"seq' $OUT/profile_$seq.log | cut -c1-1200
done
cd $OUT && tar czf results.tgz --exclude results.tgz * && ls | grep -v -e results.tgz | xargs rm -f
