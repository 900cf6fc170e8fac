#!/usr/bin/env bash
# Session 16, call 4 (nvidia-h200-x2), issue 17, the committed kernels.
# GPU 0: bench.py (NF4 base, then --base mxfp4) at 2k and 4k, graphs; the reference (transformers + PEFT).
# GPU 1: bench.py with expert LoRA; the GPU tests not run in call 2.
source bench/gpu_session.sh || exit 1
T0=$(date +%s)
(
  export CUDA_VISIBLE_DEVICES=0
  for base in nf4 mxfp4; do
    timeout 150 python3 bench/bench.py --checkpoint $CKPT --seqs 2048,4096 --quick --graphs --steps 8 --base $base \
      --out $OUT/bench_$base.json > $OUT/bench_$base.log 2>&1
    echo "bench $base rc=$? t=$(( $(date +%s) - T0 ))"; grep -E '"seq"|skipped|loaded' $OUT/bench_$base.log | cut -c1-300
  done
  (cd bench && SEQS=2048,4096 STEPS=5 OUT=$OUT timeout 200 python3 hf_peft_baseline.py > $OUT/hf_peft.log 2>&1)
  echo "hf rc=$? t=$(( $(date +%s) - T0 ))"; grep '^{"seq"' $OUT/hf_peft.log
) > $OUT/gpu0.txt 2>&1 &
(
  export CUDA_VISIBLE_DEVICES=1
  timeout 150 python3 bench/bench.py --checkpoint $CKPT --seqs 2048,4096 --quick --graphs --steps 8 \
    --targets q_proj,k_proj,v_proj,o_proj,experts --out $OUT/bench_experts.json > $OUT/bench_experts.log 2>&1
  echo "bench experts rc=$? t=$(( $(date +%s) - T0 ))"; grep -E '"seq"|skipped' $OUT/bench_experts.log
  timeout 330 python3 -m pytest -m gpu tests/test_gpu.py tests/test_mxfp4.py -p no:cacheprovider -rA \
    -k "not (nf4_experts_equal or mxfp4 or padding or tiled)" > $OUT/gpu_tests.log 2>&1
  echo "gpu tests rc=$? t=$(( $(date +%s) - T0 ))"; grep -E "^(PASSED|FAILED|ERROR)|passed|failed" $OUT/gpu_tests.log
) > $OUT/gpu1.txt 2>&1 &
wait
cat $OUT/gpu0.txt; echo ======; cat $OUT/gpu1.txt
cd $OUT && tar czf results.tgz --exclude results.tgz * && ls | grep -v -e results.tgz -e gpu0.txt -e gpu1.txt | xargs rm -f
