#!/usr/bin/env bash
# Session 16, call 6 (nvidia-h200-x2), issue 17: the expert MLP's backward as one kernel (nf4_gemm.mlp_backward)
# against the compiled chain it replaces; old = HEAD before it (70e1f9f, unpacked in .gpu/base).
# GPU 0: the kernels (old, new, old, new), then the GPU tests of the fused expert layer.
# GPU 1: bench.py old, new at 2,048 and 4,096 tokens.
source bench/gpu_session.sh || exit 1
T0=$(date +%s)
(
  export CUDA_VISIBLE_DEVICES=0
  for v in base new base new; do
    tree=.; [[ $v == base ]] && tree=.gpu/base
    timeout 60 python3 bench/expert_kernels.py --rows 8192,16384 --tree $tree 2>&1 | grep -E 'part|Error' | sed "s/^/$v /"
  done
  timeout 150 python3 -m pytest -m gpu tests/test_gpu.py tests/test_mxfp4.py -p no:cacheprovider -rA \
    -k "(nf4_experts_equal and None) or mxfp4_experts_equal or bit_reproducible or padding_gets_no_expert" > $OUT/gpu_tests.log 2>&1
  echo "gpu tests rc=$? t=$(( $(date +%s) - T0 ))"; grep -E "^(PASSED|FAILED|ERROR)|passed|failed" $OUT/gpu_tests.log
) > $OUT/gpu0.txt 2>&1 &
(
  export CUDA_VISIBLE_DEVICES=1
  for v in base new; do
    dir=.; [[ $v == base ]] && dir=.gpu/base
    (cd $dir && timeout 120 python3 bench/bench.py --checkpoint $CKPT --seqs 2048,4096 --quick --graphs --steps 8 \
      --out $OUT/bench_$v.json) > $OUT/bench_$v.log 2>&1
    echo "bench $v rc=$? t=$(( $(date +%s) - T0 ))"; grep '"seq"' $OUT/bench_$v.log
  done
) > $OUT/gpu1.txt 2>&1 &
wait
cat $OUT/gpu0.txt; echo =====; cat $OUT/gpu1.txt
cd $OUT && tar czf results.tgz --exclude results.tgz * && ls | grep -v -e results.tgz -e gpu0.txt -e gpu1.txt | xargs rm -f
