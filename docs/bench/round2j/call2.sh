#!/usr/bin/env bash
# Session 21, call 2 (nvidia-h200-x2), issue 17. GPU 0: a Triton grouped product over bf16 experts against
# torch._grouped_mm (bench/dense_grouped_triton.py); the CPU embedding's lookup, pageable and blocking
# against pinned and non-blocking (.gpu/embed_time.py); the GPU tests the change touches. GPU 1: the
# step with the embedding on the CPU and the dense path, H = HEAD (pageable lookup) against this tree,
# each in a fresh process, order H, new, new, H. "This tree" had call2_pinned_embedding.patch applied (not
# kept: it did not pay, docs/BENCHMARKS.md).
source bench/gpu_session.sh || exit 1
T0=$(date +%s)
run() {  # tree label extra-args...
  local tree=$1 label=$2; shift 2
  (cd $tree && timeout 120 python3 bench/bench.py --checkpoint $CKPT --seqs 2048,4096 --graphs --steps 8 \
     --config "embedding on cpu" --dense-experts 1 --out $OUT/$label.json "$@" > $OUT/$label.log 2>&1)
  echo "$label rc=$? t=$(( $(date +%s) - T0 ))"; grep -E '"seq"' $OUT/$label.log | cut -c1-170
}
NEW=$PWD; H=$PWD/.gpu/treeH
( export CUDA_VISIBLE_DEVICES=0
  timeout 200 python3 bench/dense_grouped_triton.py --rows 8192,16384 > $OUT/dense_grouped_triton.log 2>&1
  echo "triton rc=$? t=$(( $(date +%s) - T0 ))"; cat $OUT/dense_grouped_triton.log
  timeout 60 python3 .gpu/embed_time.py > $OUT/embed_time.log 2>&1
  echo "embed rc=$? t=$(( $(date +%s) - T0 ))"; cat $OUT/embed_time.log
  timeout 200 python3 -m pytest -m gpu tests/test_gpu.py -k "embedding or kept or offloaded or tiled" -p no:cacheprovider > $OUT/gpu_tests.log 2>&1
  echo "gpu tests rc=$? t=$(( $(date +%s) - T0 ))"; tail -2 $OUT/gpu_tests.log; grep -E "FAILED|^E " $OUT/gpu_tests.log | head
) > $OUT/gpu0.txt 2>&1 &
( export CUDA_VISIBLE_DEVICES=1
  run $H emb_H_1; run $NEW emb_new_1; run $NEW emb_new_2; run $H emb_H_2
) > $OUT/gpu1.txt 2>&1 &
wait
cat $OUT/gpu0.txt; echo ======; cat $OUT/gpu1.txt
cd $OUT && tar czf results.tgz --exclude results.tgz * && ls | grep -v -e results.tgz -e gpu0.txt -e gpu1.txt | xargs rm -f
