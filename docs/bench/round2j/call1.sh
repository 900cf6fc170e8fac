#!/usr/bin/env bash
# Session 21, call 1 (nvidia-h200-x2), issue 17: the dense path with the embedding on the CPU, each in a
# fresh process (its own peak, no other model loaded before it), beside the default's fused and dense
# paths and transformers + PEFT in the same call; torch._grouped_mm's weight layouts at the experts' shapes.
source bench/gpu_session.sh || exit 1
T0=$(date +%s)
run() {  # label extra-args...
  local label=$1; shift
  timeout 130 python3 bench/bench.py --checkpoint $CKPT --seqs 2048,4096 --graphs --steps 8 \
     --out $OUT/$label.json "$@" > $OUT/$label.log 2>&1
  echo "$label rc=$? t=$(( $(date +%s) - T0 ))"; grep -E '"seq"' $OUT/$label.log | cut -c1-170
}
( export CUDA_VISIBLE_DEVICES=0
  run emb_dense_gpu0 --config "embedding on cpu" --dense-experts 1
  run default_gpu0 --quick --dense-experts 0,1
  timeout 90 python3 bench/grouped_layouts.py --rows 8192,16384 > $OUT/grouped_layouts.log 2>&1
  echo "layouts rc=$? t=$(( $(date +%s) - T0 ))"; cat $OUT/grouped_layouts.log
) > $OUT/gpu0.txt 2>&1 &
( export CUDA_VISIBLE_DEVICES=1
  (cd bench && SEQS=2048,4096 STEPS=5 OUT=$OUT timeout 150 python3 hf_peft_baseline.py > $OUT/hf_peft.log 2>&1)
  echo "hf rc=$? t=$(( $(date +%s) - T0 ))"; grep '^{"seq"' $OUT/hf_peft.log
  run emb_dense_gpu1 --config "embedding on cpu" --dense-experts 1
  run emb_fused_gpu1 --config "embedding on cpu" --dense-experts 0
) > $OUT/gpu1.txt 2>&1 &
wait
cat $OUT/gpu0.txt; echo ======; cat $OUT/gpu1.txt
cd $OUT && tar czf results.tgz --exclude results.tgz * && ls | grep -v -e results.tgz -e gpu0.txt -e gpu1.txt | xargs rm -f
