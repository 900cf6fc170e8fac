#!/usr/bin/env bash
# Session 15, call 4 (nvidia-h200-x2). GPU 0: 16's 65k through train.py as it runs (no memory history),
# frugal flags, the plan's headroom 1; then train.py at the plan's own suggestion, --max-seq-len 61142,
# default flags. GPU 1: the GPU tests call 3 had no time for.
source bench/gpu_session.sh || exit 1
T0=$(date +%s)
(
  export CUDA_VISIBLE_DEVICES=0
  QLORA_GPU_MEMORY_GIB=15.58 timeout 180 python3 bench/memory_snapshot.py --out $OUT/none.pickle --headroom 1.0 --no-history -- \
    --model $CKPT --data .gpu/long --rank 16 --output-dir /tmp/runs/L65 --max-seq-len 65536 --grad-accum 1 \
    --max-steps 2 --no-eval-base --embedding-on-cpu --offload-activations --lm-head-nf4 --expert-tile 2048 > $OUT/L65.log 2>&1
  echo "L65 rc=$? t=$(( $(date +%s) - T0 ))"
  grep -E '^(\{|memory plan|done|GPU memory|error)' $OUT/L65.log | cut -c1-1500
  cp /tmp/runs/L65/out-of-memory.txt $OUT/L65.out-of-memory.txt 2>/dev/null
  QLORA_GPU_MEMORY_GIB=15.58 timeout 180 python3 train.py --model $CKPT --data .gpu/long --rank 16 --output-dir /tmp/runs/L61 \
    --max-seq-len 61142 --grad-accum 1 --max-steps 2 > $OUT/L61.log 2>&1
  echo "L61 rc=$? t=$(( $(date +%s) - T0 ))"
  grep -E '^(memory plan|done|GPU memory|error)' $OUT/L61.log | cut -c1-1500
  cp /tmp/runs/L61/out-of-memory.txt $OUT/L61.out-of-memory.txt 2>/dev/null; cat /tmp/runs/L61/metrics.jsonl >> $OUT/L61.log 2>/dev/null
) > $OUT/gpu0.txt 2>&1 &
(
  export CUDA_VISIBLE_DEVICES=1
  timeout 420 python3 -m pytest -m gpu tests/test_gpu.py tests/test_mxfp4.py -k "plain_path or non_finite or tiled or offloaded or on_the_gpu" \
    -v -p no:cacheprovider > $OUT/gpu_tests.log 2>&1
  echo "gpu tests rc=$? t=$(( $(date +%s) - T0 ))"; grep -E "PASSED|FAILED|ERROR|passed|failed" $OUT/gpu_tests.log | tail -12
) > $OUT/gpu1.txt 2>&1 &
wait
cat $OUT/gpu0.txt; echo ======; cat $OUT/gpu1.txt
cd $OUT && tar czf results.tgz --exclude results.tgz * && ls | grep -v -e results.tgz -e gpu0.txt -e gpu1.txt | xargs rm -f
