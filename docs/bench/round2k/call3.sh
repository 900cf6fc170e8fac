#!/usr/bin/env bash
# Session 22, call 3 (nvidia-h200, one GPU, one process at a time: nothing else on the host), issue 17:
# the issue's figures on the final code, ours and the reference in one call on one GPU: ours in the
# in-bound configuration (dense path, embedding on the CPU) before and after the reference, and the issue's
# own configuration (fused kernels, embedding on the GPU) once.
source bench/gpu_session.sh || exit 1
T0=$(date +%s)
run() {  # label extra-args...
  local label=$1; shift
  timeout 120 python3 bench/bench.py --checkpoint $CKPT --seqs 2048,4096 --graphs --steps 8 --out $OUT/$label.json \
    "$@" > $OUT/$label.log 2>&1
  echo "$label rc=$? t=$(( $(date +%s) - T0 ))"; grep -E '"seq"' $OUT/$label.log | cut -c1-150
}
run inbound_1 --config "embedding on cpu" --dense-experts 1
(cd bench && SEQS=2048,4096 STEPS=5 OUT=$OUT timeout 240 python3 hf_peft_baseline.py > $OUT/ref.log 2>&1)
echo "ref rc=$? t=$(( $(date +%s) - T0 ))"; tail -4 $OUT/ref.log | cut -c1-300
run inbound_2 --config "embedding on cpu" --dense-experts 1
run issue_own --config default --dense-experts 0
cd $OUT && tar czf results.tgz --exclude results.tgz * && ls | grep -v -e results.tgz | xargs rm -f
