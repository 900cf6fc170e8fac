#!/usr/bin/env bash
# Session 19, call 5 (nvidia-h200-x2), issue 17: the final code. GPU 0: the step's breakdown on the dense
# path (eager, 2,048 tokens), then attention-only and expert LoRA, dense path (expert LoRA also without),
# on one GPU for the 1.3x bound. GPU 1: transformers + PEFT, then bench.py: kept 0/24 x dense off/on, and
# the embedding on the CPU with the dense path off/on.
source bench/gpu_session.sh || exit 1
T0=$(date +%s)
( export CUDA_VISIBLE_DEVICES=0
  timeout 120 python3 bench/profile_step.py --checkpoint $CKPT --seq 2048 --kernels 40 --dense-experts > $OUT/profile_dense.log 2>&1
  echo "profile rc=$? t=$(( $(date +%s) - T0 ))"; grep -E "^seq|^\{\"seq" $OUT/profile_dense.log
  timeout 90 python3 bench/bench.py --checkpoint $CKPT --seqs 2048,4096 --graphs --steps 8 --quick --dense-experts 1 \
    --out $OUT/bench_attn.json > $OUT/bench_attn.log 2>&1
  echo "bench attn rc=$? t=$(( $(date +%s) - T0 ))"; grep -E '"seq"' $OUT/bench_attn.log | cut -c1-200
  timeout 120 python3 bench/bench.py --checkpoint $CKPT --seqs 2048,4096 --graphs --steps 8 --quick --dense-experts 1,0 \
    --targets q_proj,k_proj,v_proj,o_proj,experts --out $OUT/bench_experts.json > $OUT/bench_experts.log 2>&1
  echo "bench experts rc=$? t=$(( $(date +%s) - T0 ))"; grep -E '"seq"' $OUT/bench_experts.log | cut -c1-200
) > $OUT/gpu0.txt 2>&1 &
( export CUDA_VISIBLE_DEVICES=1
  (cd bench && SEQS=2048,4096 STEPS=5 OUT=$OUT timeout 80 python3 hf_peft_baseline.py > $OUT/hf_peft.log 2>&1)
  echo "hf rc=$? t=$(( $(date +%s) - T0 ))"; grep '^{"seq"' $OUT/hf_peft.log
  timeout 250 python3 bench/bench.py --checkpoint $CKPT --seqs 2048,4096 --variants 2048,4096 --graphs --steps 8 \
    --quick --kept-blocks 0,24 --dense-experts 0,1 --out $OUT/bench_final.json > $OUT/bench_final.log 2>&1
  echo "bench final rc=$? t=$(( $(date +%s) - T0 ))"; grep -E '"seq"' $OUT/bench_final.log | cut -c1-200
) > $OUT/gpu1.txt 2>&1 &
wait
cat $OUT/gpu0.txt; echo ======; cat $OUT/gpu1.txt
grep -A40 '"ms"' $OUT/profile_dense.log | head -45
cd $OUT && tar czf results.tgz --exclude results.tgz * && ls | grep -v -e results.tgz -e gpu0.txt -e gpu1.txt | xargs rm -f
