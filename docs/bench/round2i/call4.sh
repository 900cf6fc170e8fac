#!/usr/bin/env bash
# Session 20, call 4 (nvidia-h200-x2), issue 17: train.py itself on HEAD. GPU 0: the user's default run
# under the 16 GB cap, then attention-only under an 80 GB cap. GPU 1: expert LoRA under an 80 GB cap
# (the plan's kept blocks with the adapters' new per-block bytes).
source bench/gpu_session.sh || exit 1
EXP=q_proj,k_proj,v_proj,o_proj,experts
( export CUDA_VISIBLE_DEVICES=0
  timeout 100 bash bench/user_run.sh default_12 --max-steps 12
  CAP=80 timeout 100 bash bench/user_run.sh cap80_12 --max-steps 12
) > $OUT/gpu0.txt 2>&1 &
( export CUDA_VISIBLE_DEVICES=1
  CAP=80 timeout 120 bash bench/user_run.sh experts_cap80_12 --max-steps 12 --targets $EXP
  timeout 100 bash bench/user_run.sh experts_12 --max-steps 12 --targets $EXP
) > $OUT/gpu1.txt 2>&1 &
wait
cat $OUT/gpu0.txt; echo ======; cat $OUT/gpu1.txt
grep -h SUMMARY $OUT/*.log
cd $OUT && tar czf results.tgz --exclude results.tgz * && ls | grep -v -e results.tgz -e gpu0.txt -e gpu1.txt | xargs rm -f
