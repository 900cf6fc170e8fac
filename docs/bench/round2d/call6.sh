#!/usr/bin/env bash
# Session 15, call 6: which import starts CUDA's allocator before train.py's main() set growable segments;
# then the 65k command again with the setting moved above the imports.
source bench/gpu_session.sh >/dev/null || exit 1
export CUDA_VISIBLE_DEVICES=0
for m in bitsandbytes model memory_plan data; do
  python3 -c "import torch, $m; print('$m initialises CUDA:', torch.cuda.is_initialized())" 2>&1 | tail -1
done
QLORA_GPU_MEMORY_GIB=15.58 timeout 120 python3 train.py --model $CKPT --data .gpu/long --rank 16 --output-dir /tmp/runs/H95b \
  --max-seq-len 65536 --memory-headroom 0.95 --grad-accum 1 --max-steps 2 > $OUT/H95b.log 2>&1
echo "H95b rc=$?"; grep -E '^(memory plan|done|GPU memory|error)' $OUT/H95b.log | cut -c1-600
head -5 /tmp/runs/H95b/out-of-memory.txt 2>/dev/null; grep -E "reserved segments" /tmp/runs/H95b/out-of-memory.txt 2>/dev/null
cat /tmp/runs/H95b/metrics.jsonl >> $OUT/H95b.log 2>/dev/null
