#!/usr/bin/env bash
# Session 22, call 1 (nvidia-h200-x2), issue 17. GPU 0: the GPU suite on the current code (the review
# commits e3d2152 and 8ca46cf had not run on a GPU). GPU 1: where bench.py's step goes beyond the graph's
# kernels (.gpu/overhead.py), then NF4's dequantisation against two variants (.gpu/dequant_variants.py).
source bench/gpu_session.sh || exit 1
T0=$(date +%s)
( CUDA_VISIBLE_DEVICES=0 timeout 420 python3 -m pytest -m gpu tests/test_gpu.py -q -x > $OUT/gpu_tests.log 2>&1
  echo "tests rc=$? t=$(( $(date +%s) - T0 ))"; tail -3 $OUT/gpu_tests.log ) > $OUT/gpu0.txt 2>&1 &
P0=$!
( export CUDA_VISIBLE_DEVICES=1
  timeout 200 python3 .gpu/overhead.py > $OUT/overhead.log 2>&1
  echo "overhead rc=$? t=$(( $(date +%s) - T0 ))"; grep '"seq"' $OUT/overhead.log
  timeout 150 python3 .gpu/dequant_variants.py > $OUT/dequant.log 2>&1
  echo "dequant rc=$? t=$(( $(date +%s) - T0 ))"; cat $OUT/dequant.log | cut -c1-200 ) > $OUT/gpu1.txt 2>&1 &
P1=$!
wait $P0 $P1
cat $OUT/gpu0.txt $OUT/gpu1.txt
cd $OUT && tar czf results.tgz --exclude results.tgz * && ls | grep -v -e results.tgz -e gpu0.txt -e gpu1.txt | xargs rm -f
