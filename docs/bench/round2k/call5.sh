#!/usr/bin/env bash
# Session 22, call 5 (nvidia-h200-x2): the user's default run (bench/user_run.sh: train.py --rank 16 under the
# 15.58 GiB cap, 4,096-token packed rows, 8 examples a step), 40 steps, H = fb2b414 (rows of 4,096) against
# N = 9cc4df8 (rows cut to multiples of 512; not kept: that commit is call5_cut_rows.patch, beside this script);
# round 1 N on GPU 0 and H on GPU 1 (cold compile caches), round 2
# swapped (warm). Then on GPU 0 the GPU tests that run train.py (identical runs, resume, SIGTERM).
source bench/gpu_session.sh || exit 1
T0=$(date +%s)
N=$PWD; H=$PWD/.gpu/base
user() {  # tree name
  (cd $1 && DIR=/tmp/runs/$2 timeout 150 bash $N/bench/user_run.sh $2 --max-steps 40)
  echo "t=$(( $(date +%s) - T0 ))"
}
( export CUDA_VISIBLE_DEVICES=0; user $N N_round1 ) > $OUT/gpu0.txt 2>&1 &
P0=$!
( export CUDA_VISIBLE_DEVICES=1; user $H H_round1 ) > $OUT/gpu1.txt 2>&1 &
P1=$!
wait $P0 $P1
( export CUDA_VISIBLE_DEVICES=0; user $H H_round2 ) >> $OUT/gpu0.txt 2>&1 &
P0=$!
( export CUDA_VISIBLE_DEVICES=1; user $N N_round2 ) >> $OUT/gpu1.txt 2>&1 &
P1=$!
wait $P0 $P1
CUDA_VISIBLE_DEVICES=0 timeout 200 python3 -m pytest -m gpu tests/test_gpu.py -p no:cacheprovider \
  -k "identical or resuming or sigterm" > $OUT/gpu_tests.log 2>&1
echo "gpu tests rc=$? t=$(( $(date +%s) - T0 ))" >> $OUT/gpu0.txt; tail -2 $OUT/gpu_tests.log >> $OUT/gpu0.txt
grep -E "FAILED|^E " $OUT/gpu_tests.log | head >> $OUT/gpu0.txt
cat $OUT/gpu0.txt; echo ======; cat $OUT/gpu1.txt
cd $OUT && tar czf results.tgz --exclude results.tgz * && ls | grep -v -e results.tgz -e gpu0.txt -e gpu1.txt | xargs rm -f
