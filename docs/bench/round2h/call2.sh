#!/usr/bin/env bash
# Session 19, call 2 (nvidia-h200-x2), issue 17: the Gluon prototype (register-operand weights) against
# nf4_gemm's Triton kernels, with the weights prefetched a step ahead in registers, at gpt-oss-20b's expert shapes. GPU 0 only.
source bench/gpu_session.sh || exit 1
T0=$(date +%s)
( export CUDA_VISIBLE_DEVICES=0
  timeout 420 python3 bench/gluon_rs_forward.py --rows 8192,16384 > $OUT/gluon.log 2>&1
  echo "gluon rc=$? t=$(( $(date +%s) - T0 ))"
) > $OUT/gpu0.txt 2>&1
cat $OUT/gpu0.txt; grep -v '^{' $OUT/gluon.log | tail -40; grep '^{' $OUT/gluon.log
