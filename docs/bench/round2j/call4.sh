#!/usr/bin/env bash
# Session 21, call 4 (nvidia-h200-x2), issue 17, the final code: GPU 0, the step's breakdown on the
# configuration within the memory (the dense path, the embedding on the CPU) at 2,048 and 4,096
# tokens; GPU 1, the whole GPU suite (test_gpu.py's helpers were refactored last session without a GPU run).
source bench/gpu_session.sh || exit 1
T0=$(date +%s)
( export CUDA_VISIBLE_DEVICES=0
  for seq in 2048 4096; do
    timeout 150 python3 bench/profile_step.py --checkpoint $CKPT --seq $seq --kernels 40 --dense-experts \
      --embedding-device cpu > $OUT/profile_dense_emb_cpu_$seq.log 2>&1
    echo "profile $seq rc=$? t=$(( $(date +%s) - T0 ))"; grep -E '^\{"seq' $OUT/profile_dense_emb_cpu_$seq.log | cut -c1-1200
  done
) > $OUT/gpu0.txt 2>&1 &
( export CUDA_VISIBLE_DEVICES=1
  timeout 520 python3 -m pytest -m gpu tests/test_gpu.py -p no:cacheprovider > $OUT/gpu_tests.log 2>&1
  echo "gpu tests rc=$? t=$(( $(date +%s) - T0 ))"; tail -2 $OUT/gpu_tests.log; grep -E "FAILED|^E " $OUT/gpu_tests.log | head -20
) > $OUT/gpu1.txt 2>&1 &
wait
cat $OUT/gpu0.txt; echo ======; cat $OUT/gpu1.txt
cd $OUT && tar czf results.tgz --exclude results.tgz * && ls | grep -v -e results.tgz -e gpu0.txt -e gpu1.txt | xargs rm -f
