#!/usr/bin/env bash
# Session 22, call 2 (nvidia-h200-x2), issue 17: NF4's dequantisation stored as 32-bit pairs, 128 blocks a
# program, 8 warps (this tree) against HEAD 2185483 (H: joined halves, 64 blocks, 4 warps), in the issue's
# in-bound configuration (dense path, embedding on the CPU), each run a fresh process; GPU 0 in order
# H N N H H N, GPU 1 in order N H H N N H. Then the GPU tests the change touches, on GPU 0.
source bench/gpu_session.sh || exit 1
T0=$(date +%s)
run() {  # tree label
  local tree=$1 label=$2
  (cd $tree && timeout 120 python3 bench/bench.py --checkpoint $CKPT --seqs 2048,4096 --graphs --steps 8 \
     --config "embedding on cpu" --dense-experts 1 --out $OUT/$label.json > $OUT/$label.log 2>&1)
  echo "$label rc=$? t=$(( $(date +%s) - T0 ))"; grep -E '"seq"' $OUT/$label.log | cut -c1-150
}
N=$PWD; H=$PWD/.gpu/base
( export CUDA_VISIBLE_DEVICES=0
  run $H H_g0_1; run $N N_g0_1; run $N N_g0_2; run $H H_g0_2; run $H H_g0_3; run $N N_g0_3 ) > $OUT/gpu0.txt 2>&1 &
P0=$!
( export CUDA_VISIBLE_DEVICES=1
  run $N N_g1_1; run $H H_g1_1; run $H H_g1_2; run $N N_g1_2; run $N N_g1_3; run $H H_g1_3 ) > $OUT/gpu1.txt 2>&1 &
P1=$!
wait $P0 $P1
CUDA_VISIBLE_DEVICES=0 timeout 200 python3 -m pytest -m gpu tests/test_gpu.py -p no:cacheprovider \
  -k "dequantisation or dense_path or dense_experts or lora or reproducible or padding" > $OUT/gpu_tests.log 2>&1
echo "gpu tests rc=$? t=$(( $(date +%s) - T0 ))" >> $OUT/gpu0.txt; tail -2 $OUT/gpu_tests.log >> $OUT/gpu0.txt
grep -E "FAILED|^E " $OUT/gpu_tests.log | head >> $OUT/gpu0.txt
cat $OUT/gpu0.txt; echo ======; cat $OUT/gpu1.txt
cd $OUT && tar czf results.tgz --exclude results.tgz * && ls | grep -v -e results.tgz -e gpu0.txt -e gpu1.txt | xargs rm -f
