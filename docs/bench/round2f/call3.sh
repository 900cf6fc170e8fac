#!/usr/bin/env bash
# Session 17, call 3 (nvidia-h200-x2): why the first step is slower with kept blocks. train.py at 2,048 tokens,
# cap 15.58, 2 steps, dynamo's compile log, kept auto (5) / 0, one GPU each.
source bench/gpu_session.sh || exit 1
T0=$(date +%s)
for kept in auto 0; do
  (
    export CUDA_VISIBLE_DEVICES=$([[ $kept == auto ]] && echo 0 || echo 1)
    flag=$([[ $kept == auto ]] || echo "--kept-blocks $kept")
    TORCH_LOGS=recompiles,dynamo TORCH_LOGS_FORMAT="%(asctime)s %(message)s" QLORA_GPU_MEMORY_GIB=15.58 timeout 200 \
      python3 train.py --model $CKPT --data $DATA --output-dir /tmp/r_$kept --max-seq-len 2048 --max-steps 3 $flag \
      > $OUT/first_$kept.log 2>&1
    echo "kept $kept rc=$? t=$(( $(date +%s) - T0 ))"
    grep -c "torchdynamo start tracing" $OUT/first_$kept.log
    grep -E "Recompiling|triggered by|guard" $OUT/first_$kept.log | cut -c1-250 | head -20
    grep -E "start tracing" $OUT/first_$kept.log | sed -E 's/.*start tracing ([^ ]+) .*/\1/' | sort | uniq -c
    grep -E "GPU memory|^done" $OUT/first_$kept.log
    cat /tmp/r_$kept/metrics.jsonl | head -4 | cut -c1-300
  ) > $OUT/lane_$kept.txt 2>&1 &
done
wait
cat $OUT/lane_auto.txt; echo =====; cat $OUT/lane_0.txt
cd $OUT && tar czf results.tgz --exclude results.tgz * && ls | grep -v -e results.tgz -e lane_ | xargs rm -f
