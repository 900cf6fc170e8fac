#!/usr/bin/env bash
# Session 20, call 2 (nvidia-h200-x2), issue 17. A/B of nf4_gemm.sum_rows (the fused layer's sums of each
# token's k rows in one kernel): P = ccddaf1 (before it) against HEAD, attention-only, dense path off/on,
# both GPUs in opposite orders. Then GPU 0: expert LoRA kept 0/24 (the kept block's bytes with the adapters
# in the fused layer), the profile on HEAD; GPU 1: the user's run with expert LoRA under the 16 GB cap,
# transformers + PEFT, the final figures (kept 0/24 x dense off/on).
source bench/gpu_session.sh || exit 1
T0=$(date +%s)
run() {  # tree label extra-args...
  local tree=$1 label=$2; shift 2
  (cd $tree && timeout 150 python3 bench/bench.py --checkpoint $CKPT --seqs 2048,4096 --graphs --steps 8 --quick \
     --out $OUT/$label.json "$@" > $OUT/$label.log 2>&1)
  echo "$label rc=$? t=$(( $(date +%s) - T0 ))"; grep -E '"seq"' $OUT/$label.log | cut -c1-170
}
ATT=q_proj,k_proj,v_proj,o_proj; EXP=$ATT,experts; NEW=$PWD; P=$PWD/.gpu/treeP
( export CUDA_VISIBLE_DEVICES=0
  run $P attn_P_gpu0 --dense-experts 0,1; run $NEW attn_new_gpu0 --dense-experts 0,1
  run $NEW lora_kept_gpu0 --dense-experts 1 --kept-blocks 0,24 --targets $EXP
  timeout 120 python3 bench/profile_step.py --checkpoint $CKPT --seq 2048 --kernels 40 --dense-experts > $OUT/profile_dense.log 2>&1
  echo "profile rc=$? t=$(( $(date +%s) - T0 ))"; grep -E '^\{"seq' $OUT/profile_dense.log | cut -c1-900
) > $OUT/gpu0.txt 2>&1 &
( export CUDA_VISIBLE_DEVICES=1
  run $NEW attn_new_gpu1 --dense-experts 0,1; run $P attn_P_gpu1 --dense-experts 0,1
  timeout 90 bash bench/user_run.sh experts_12 --max-steps 12 --targets $EXP
  (cd bench && SEQS=2048,4096 STEPS=5 OUT=$OUT timeout 80 python3 hf_peft_baseline.py > $OUT/hf_peft.log 2>&1)
  echo "hf rc=$? t=$(( $(date +%s) - T0 ))"; grep '^{"seq"' $OUT/hf_peft.log
  run $NEW final_gpu1 --variants 2048,4096 --kept-blocks 0,24 --dense-experts 0,1
) > $OUT/gpu1.txt 2>&1 &
wait
cat $OUT/gpu0.txt; echo ======; cat $OUT/gpu1.txt
cd $OUT && tar czf results.tgz --exclude results.tgz * && ls | grep -v -e results.tgz -e gpu0.txt -e gpu1.txt | xargs rm -f
