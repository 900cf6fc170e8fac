#!/usr/bin/env bash
# Session 20, call 3 (nvidia-h200-x2), issue 17. GPU 0: the whole GPU suite on HEAD. GPU 1: A/B of the
# int16 sort keys (Q = HEAD~1, int64 keys, against HEAD), attention-only, dense path off/on, Q-new-new-Q.
source bench/gpu_session.sh || exit 1
T0=$(date +%s)
run() {  # tree label extra-args...
  local tree=$1 label=$2; shift 2
  (cd $tree && timeout 120 python3 bench/bench.py --checkpoint $CKPT --seqs 2048,4096 --graphs --steps 8 --quick \
     --out $OUT/$label.json "$@" > $OUT/$label.log 2>&1)
  echo "$label rc=$? t=$(( $(date +%s) - T0 ))"; grep -E '"seq"' $OUT/$label.log | cut -c1-170
}
NEW=$PWD; Q=$PWD/.gpu/treeQ
( export CUDA_VISIBLE_DEVICES=0
  timeout 400 python3 -m pytest -m gpu tests/test_gpu.py -p no:cacheprovider > $OUT/gpu_tests.log 2>&1
  echo "gpu suite rc=$? t=$(( $(date +%s) - T0 ))"; tail -3 $OUT/gpu_tests.log; grep -E "FAILED|^E " $OUT/gpu_tests.log | head -20
) > $OUT/gpu0.txt 2>&1 &
( export CUDA_VISIBLE_DEVICES=1
  run $Q attn_Q_a --dense-experts 0,1; run $NEW attn_new_a --dense-experts 0,1
  run $NEW attn_new_b --dense-experts 0,1; run $Q attn_Q_b --dense-experts 0,1
) > $OUT/gpu1.txt 2>&1 &
wait
cat $OUT/gpu0.txt; echo ======; cat $OUT/gpu1.txt
cd $OUT && tar czf results.tgz --exclude results.tgz * && ls | grep -v -e results.tgz -e gpu0.txt -e gpu1.txt | xargs rm -f
