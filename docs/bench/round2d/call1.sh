#!/usr/bin/env bash
# Session 15, call 1 (nvidia-h200-x2).
# GPU 0: issue 14's evaluation timing at 80 and 2,000 prompts (16 GB cap); issue 16's 65k train.py run
#        under the allocator's memory history (cap 15.58, the plan's headroom set to 1), then the same
#        with the model's small tensors compacted after loading.
# GPU 1: issue 16's "speed at 2k and 4k no worse than today": bench.py of round 1's last commit
#        (a8bed8e, in .gpu/old) against HEAD, same GPU, same call.
source bench/gpu_session.sh || exit 1
T0=$(date +%s)
(
  export CUDA_VISIBLE_DEVICES=0
  QLORA_GPU_MEMORY_GIB=15.58 timeout 150 python3 bench/eval_timing.py --random gpt-oss-20b --checkpoint .gpu/tokenizer.json \
    --data .gpu/jbh2k/val.jsonl --n 80,2000 --rows 1 > $OUT/eval_timing.log 2>&1
  echo "eval rc=$? t=$(( $(date +%s) - T0 ))"; grep '^{' $OUT/eval_timing.log || tail -5 $OUT/eval_timing.log
  for v in plain compact; do
    extra=""; [[ $v == compact ]] && extra=--compact-after-load
    QLORA_GPU_MEMORY_GIB=15.58 timeout 200 python3 bench/memory_snapshot.py --out $OUT/oom_$v.pickle --headroom 1.0 $extra -- \
      --model $CKPT --data .gpu/long --rank 16 --output-dir /tmp/runs/L65$v --max-seq-len 65536 --grad-accum 1 \
      --max-steps 3 --no-eval-base > $OUT/L65$v.log 2>&1
    echo "L65 $v rc=$? t=$(( $(date +%s) - T0 ))"
    grep -E '^(\{|memory plan|done|GPU memory|error)' $OUT/L65$v.log | cut -c1-3000
  done
) > $OUT/gpu0.txt 2>&1 &
(
  export CUDA_VISIBLE_DEVICES=1
  for v in old new old new; do
    dir=.; [[ $v == old ]] && dir=.gpu/old
    (cd $dir && timeout 200 python3 bench/bench.py --checkpoint $CKPT --seqs 2048,4096 --quick --graphs --steps 8 \
      --out $OUT/bench_$v.json) > $OUT/bench_$v.log 2>&1
    echo "bench $v rc=$? t=$(( $(date +%s) - T0 ))"; grep -iE 'tok|seq' $OUT/bench_$v.log | tail -4
  done
) > $OUT/gpu1.txt 2>&1 &
wait
cat $OUT/gpu0.txt; echo ======; cat $OUT/gpu1.txt
cd $OUT && tar czf results.tgz --exclude results.tgz * && ls | grep -v -e results.tgz -e gpu0.txt -e gpu1.txt | xargs rm -f
