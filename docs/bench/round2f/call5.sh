#!/usr/bin/env bash
# Session 17, call 5 (nvidia-h200-x2), issue 17: the sinks' scaling compiled (d229c60) against .gpu/base
# (b3780fb), kept 0 and 24, 2k and 4k; each GPU runs both, in opposite orders. Then the GPU tests that
# cover the change (compiled chains, flex against eager, the graphed steps).
source bench/gpu_session.sh || exit 1
T0=$(date +%s)
run() {  # tree label
  timeout 150 python3 $1/bench/bench.py --checkpoint $CKPT --seqs 2048,4096 --quick --graphs --steps 8 \
    --kept-blocks 0,24 --out $OUT/bench_$2_$CUDA_VISIBLE_DEVICES.json > $OUT/bench_$2_$CUDA_VISIBLE_DEVICES.log 2>&1
  echo "bench $2 gpu $CUDA_VISIBLE_DEVICES rc=$? t=$(( $(date +%s) - T0 ))"
  grep -E '"seq"' $OUT/bench_$2_$CUDA_VISIBLE_DEVICES.log | cut -c1-200
}
( export CUDA_VISIBLE_DEVICES=0; run .gpu/base base; run . new ) > $OUT/gpu0.txt 2>&1 &
( export CUDA_VISIBLE_DEVICES=1; run . new; run .gpu/base base
  timeout 230 python3 -m pytest -m gpu tests/test_gpu.py tests/test_mxfp4.py -p no:cacheprovider -rA -k "compiled or flex or graph or kept or logits" \
    > $OUT/gpu_tests.log 2>&1
  echo "gpu tests rc=$? t=$(( $(date +%s) - T0 ))"; grep -E "^(PASSED|FAILED|ERROR)|passed|failed" $OUT/gpu_tests.log
) > $OUT/gpu1.txt 2>&1 &
wait
cat $OUT/gpu0.txt; echo ======; cat $OUT/gpu1.txt
cd $OUT && tar czf results.tgz --exclude results.tgz * && ls | grep -v -e results.tgz -e gpu0.txt -e gpu1.txt | xargs rm -f
