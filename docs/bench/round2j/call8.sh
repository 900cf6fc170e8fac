#!/usr/bin/env bash
# Session 21, call 8 (nvidia-h200-x2), issue 17: two processes at once, one a GPU, as calls 1-3 ran them, but
# each with 16 intra-op threads (OMP_NUM_THREADS=16: the host's 32 cores split) instead of torch's default 32
# each: the dense path with the embedding on the CPU (call 1: 14,068-14,180 tokens/s at 4,096 tokens shared,
# call 7: 14,848 alone).
source bench/gpu_session.sh || exit 1
export OMP_NUM_THREADS=16
T0=$(date +%s)
run() {  # gpu label
  CUDA_VISIBLE_DEVICES=$1 timeout 110 python3 bench/bench.py --checkpoint $CKPT --seqs 2048,4096 --graphs --steps 8 \
     --config "embedding on cpu" --dense-experts 1 --out $OUT/$2.json > $OUT/$2.log 2>&1
  echo "$2 rc=$? t=$(( $(date +%s) - T0 ))"; grep -E '"seq"' $OUT/$2.log | cut -c1-165
}
run 0 emb_dense_omp16_gpu0 > $OUT/gpu0.txt 2>&1 &
P0=$!
run 1 emb_dense_omp16_gpu1 > $OUT/gpu1.txt 2>&1 &
P1=$!
wait $P0 $P1
cat $OUT/gpu0.txt $OUT/gpu1.txt
cd $OUT && tar czf results.tgz --exclude results.tgz * && ls | grep -v -e results.tgz -e gpu0.txt -e gpu1.txt | xargs rm -f
