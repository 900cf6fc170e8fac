#!/usr/bin/env bash
# Session 21, call 7 (nvidia-h200-x2), issue 17: is the CPU embedding's cost at 4,096 tokens (5% in call 1,
# where the other GPU's process ran beside it) the lookup's own, or two processes' threads on one host?
# Everything on GPU 0, one process at a time, GPU 1 idle: the lookup under several thread counts, then the
# dense path with the embedding on the CPU and on the GPU, each in a fresh process.
# (.gpu/embed_threads.py is kept as docs/bench/round2j/call7/embed_threads.py.)
source bench/gpu_session.sh || exit 1
export CUDA_VISIBLE_DEVICES=0
T0=$(date +%s)
timeout 60 python3 .gpu/embed_threads.py > $OUT/embed_threads.log 2>&1
echo "lookup rc=$? t=$(( $(date +%s) - T0 ))"; cat $OUT/embed_threads.log
run() {  # label extra-args...
  local label=$1; shift
  timeout 100 python3 bench/bench.py --checkpoint $CKPT --seqs 2048,4096 --graphs --steps 12 --dense-experts 1 \
     --out $OUT/$label.json "$@" > $OUT/$label.log 2>&1
  echo "$label rc=$? t=$(( $(date +%s) - T0 ))"; grep -E '"seq"' $OUT/$label.log | cut -c1-165
}
run emb_cpu_alone --config "embedding on cpu"
run emb_gpu_alone --config default
cd $OUT && tar czf results.tgz --exclude results.tgz * && ls | grep -v -e results.tgz | xargs rm -f
