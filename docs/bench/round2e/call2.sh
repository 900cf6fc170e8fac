#!/usr/bin/env bash
# Session 16, call 2 (nvidia-h200-x2), issue 17: the summed dim as a constexpr in the register-operand
# kernels (NF4 dx, MXFP4 y), against HEAD before it (.gpu/base), same GPU, same call.
# GPU 0: expert kernels base/new/base/new; bench.py base/new at 2k and 4k.
# GPU 1: bench.py new/base; the step's kernels listed (profile_step --kernels); the GPU tests of the kernels.
source bench/gpu_session.sh || exit 1
T0=$(date +%s)
(
  export CUDA_VISIBLE_DEVICES=0
  for v in base new base new; do
    tree=.; [[ $v == base ]] && tree=.gpu/base
    timeout 90 python3 bench/expert_kernels.py --rows 8192,16384 --tree $tree > $OUT/kernels_$v.$RANDOM.log 2>&1
    echo "kernels $v rc=$? t=$(( $(date +%s) - T0 ))"
  done
  for v in base new; do
    dir=.; [[ $v == base ]] && dir=.gpu/base
    (cd $dir && timeout 150 python3 bench/bench.py --checkpoint $CKPT --seqs 2048,4096 --quick --graphs --steps 8 \
      --out $OUT/bench_g0_$v.json) > $OUT/bench_g0_$v.log 2>&1
    echo "bench $v rc=$? t=$(( $(date +%s) - T0 ))"; grep '"seq"' $OUT/bench_g0_$v.log
  done
) > $OUT/gpu0.txt 2>&1 &
(
  export CUDA_VISIBLE_DEVICES=1
  for v in new base; do
    dir=.; [[ $v == base ]] && dir=.gpu/base
    (cd $dir && timeout 150 python3 bench/bench.py --checkpoint $CKPT --seqs 2048,4096 --quick --graphs --steps 8 \
      --out $OUT/bench_g1_$v.json) > $OUT/bench_g1_$v.log 2>&1
    echo "bench $v rc=$? t=$(( $(date +%s) - T0 ))"; grep '"seq"' $OUT/bench_g1_$v.log
  done
  timeout 120 python3 bench/profile_step.py --checkpoint $CKPT --seq 2048 --kernels 70 > $OUT/profile_2048.log 2>&1
  echo "profile rc=$? t=$(( $(date +%s) - T0 ))"
  timeout 150 python3 -m pytest -m gpu tests/test_gpu.py tests/test_mxfp4.py -q -x -p no:cacheprovider \
    -k "nf4_experts_equal or mxfp4 or padding or tiled" > $OUT/gpu_tests.log 2>&1
  echo "gpu tests rc=$? t=$(( $(date +%s) - T0 ))"; tail -3 $OUT/gpu_tests.log
) > $OUT/gpu1.txt 2>&1 &
wait
cat $OUT/gpu0.txt
python3 - <<'PY'
import json, glob, os, collections
runs = collections.defaultdict(list)
for f in sorted(glob.glob(os.environ["OUT"] + "/kernels_*.log")):
    v = os.path.basename(f).split("_")[1].split(".")[0]
    for l in open(f):
        if l.startswith('{"rows"'):
            r = json.loads(l); runs[(r["rows"], r["base"], r["proj"], r["direction"])].append((v, r["ms"]))
for k, vals in runs.items():
    print(k, vals)
PY
echo ======; cat $OUT/gpu1.txt; grep '^{"seq"' $OUT/profile_2048.log; grep '^{"ms"' $OUT/profile_2048.log | head -70
cd $OUT && tar czf results.tgz --exclude results.tgz * && ls | grep -v -e results.tgz -e gpu0.txt -e gpu1.txt | xargs rm -f
