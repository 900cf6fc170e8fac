#!/usr/bin/env bash
# Session 21, call 3 (nvidia-h200-x2), issue 17: train.py at 2,048-token rows under the 16 GB cap on an H200,
# the memory plan before (H: the embedding stays on the GPU, fused experts, some blocks kept) and now (the
# embedding moves to the CPU for the experts' dense path), both GPUs in opposite orders; then on GPU 0 the
# GPU test of the embedding on the CPU (eager and graphed, bit for bit), on this tree. "Now" was the tree
# with call3_memory_plan.patch applied (not kept: it did not pay, docs/BENCHMARKS.md).
source bench/gpu_session.sh || exit 1
T0=$(date +%s)
NEW=$PWD; H=$PWD/.gpu/treeH
user() {  # tree name
  (cd $1 && DIR=/tmp/runs/$2 timeout 150 bash $NEW/bench/user_run.sh $2 --max-seq-len 2048 --max-steps 16)
  echo "t=$(( $(date +%s) - T0 ))"
}
( export CUDA_VISIBLE_DEVICES=0
  user $H plan_H_gpu0; user $NEW plan_new_gpu0
  timeout 120 python3 -m pytest -m gpu tests/test_gpu.py -k "embedding" -p no:cacheprovider > $OUT/gpu_tests.log 2>&1
  echo "gpu tests rc=$? t=$(( $(date +%s) - T0 ))"; tail -2 $OUT/gpu_tests.log; grep -E "FAILED|^E " $OUT/gpu_tests.log | head
) > $OUT/gpu0.txt 2>&1 &
( export CUDA_VISIBLE_DEVICES=1
  user $NEW plan_new_gpu1; user $H plan_H_gpu1
) > $OUT/gpu1.txt 2>&1 &
wait
cat $OUT/gpu0.txt; echo ======; cat $OUT/gpu1.txt
cd $OUT && tar czf results.tgz --exclude results.tgz * && ls | grep -v -e results.tgz -e gpu0.txt -e gpu1.txt | xargs rm -f
