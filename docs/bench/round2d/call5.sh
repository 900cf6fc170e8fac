#!/usr/bin/env bash
# Session 15, call 5 (nvidia-h200-x2). GPU 0: the 16 GB user's 65k command, train.py --max-seq-len 65536
# --memory-headroom 0.95, nothing else. GPU 1: the user's default run (1 epoch), after flex's unpadded path.
source bench/gpu_session.sh || exit 1
T0=$(date +%s)
(
  export CUDA_VISIBLE_DEVICES=0
  QLORA_GPU_MEMORY_GIB=15.58 timeout 150 python3 train.py --model $CKPT --data .gpu/long --rank 16 --output-dir /tmp/runs/H95 \
    --max-seq-len 65536 --memory-headroom 0.95 --grad-accum 1 --max-steps 2 > $OUT/H95.log 2>&1
  echo "H95 rc=$? t=$(( $(date +%s) - T0 ))"
  grep -E '^(memory plan|  --offload|step:|done|GPU memory|error)' $OUT/H95.log | cut -c1-1500
  cat /tmp/runs/H95/metrics.jsonl >> $OUT/H95.log 2>/dev/null
) > $OUT/gpu0.txt 2>&1 &
(
  export CUDA_VISIBLE_DEVICES=1
  timeout 170 bash bench/user_run.sh DEF --epochs 1 --no-eval-base
  echo "t=$(( $(date +%s) - T0 ))"
) > $OUT/gpu1.txt 2>&1 &
wait
cat $OUT/gpu0.txt; echo ======; cat $OUT/gpu1.txt
cd $OUT && tar czf results.tgz --exclude results.tgz * && ls | grep -v -e results.tgz -e gpu0.txt -e gpu1.txt | xargs rm -f
