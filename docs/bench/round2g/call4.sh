#!/usr/bin/env bash
# Session 18, call 4 (nvidia-h200-x2), issue 17: the final code's figures with the reference in the same
# call. GPU 0: bench.py kept 0 / 24, then the user's default run (16 GB cap, 4,096 tokens) for 12 steps.
# GPU 1: transformers + PEFT, then expert LoRA (kept 0).
source bench/gpu_session.sh || exit 1
T0=$(date +%s)
( export CUDA_VISIBLE_DEVICES=0
  timeout 120 python3 bench/bench.py --checkpoint $CKPT --seqs 2048,4096 --quick --graphs --steps 8 \
    --kept-blocks 0,24 --out $OUT/bench_nf4.json > $OUT/bench_nf4.log 2>&1
  echo "bench nf4 rc=$? t=$(( $(date +%s) - T0 ))"; grep -E '"seq"' $OUT/bench_nf4.log | cut -c1-200
  timeout 75 bash bench/user_run.sh default_12 --max-steps 12
  echo "t=$(( $(date +%s) - T0 ))"
) > $OUT/gpu0.txt 2>&1 &
( export CUDA_VISIBLE_DEVICES=1
  (cd bench && SEQS=2048,4096 STEPS=5 OUT=$OUT timeout 80 python3 hf_peft_baseline.py > $OUT/hf_peft.log 2>&1)
  echo "hf rc=$? t=$(( $(date +%s) - T0 ))"; grep '^{"seq"' $OUT/hf_peft.log
  timeout 100 python3 bench/bench.py --checkpoint $CKPT --seqs 2048,4096 --quick --graphs --steps 8 \
    --kept-blocks 0 --targets q_proj,k_proj,v_proj,o_proj,experts --out $OUT/bench_experts.json > $OUT/bench_experts.log 2>&1
  echo "bench experts rc=$? t=$(( $(date +%s) - T0 ))"; grep -E '"seq"' $OUT/bench_experts.log | cut -c1-200
) > $OUT/gpu1.txt 2>&1 &
wait
cat $OUT/gpu0.txt; echo ======; cat $OUT/gpu1.txt
cd $OUT && tar czf results.tgz --exclude results.tgz * && ls | grep -v -e results.tgz -e gpu0.txt -e gpu1.txt | xargs rm -f
