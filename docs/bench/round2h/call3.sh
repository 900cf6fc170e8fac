#!/usr/bin/env bash
# Session 19, call 3 (nvidia-h200-x2), issue 17: the experts' dense path (dequantise a layer, then
# torch._grouped_mm). GPU 0: its GPU tests, the kernels one by one, then bench.py with the dense path
# off and on (default config and embedding on the CPU). GPU 1: transformers + PEFT, then the same
# bench.py sweep in the opposite order.
source bench/gpu_session.sh || exit 1
T0=$(date +%s)
( export CUDA_VISIBLE_DEVICES=0
  timeout 150 python3 -m pytest -m gpu tests/test_gpu.py -p no:cacheprovider -q -x \
    -k "dense or lora_on_the_nf4 or padding_gets or bit_reproducible or nf4_experts_equal" > $OUT/gpu_tests.log 2>&1
  echo "gpu tests rc=$? t=$(( $(date +%s) - T0 ))"; grep -E "passed|failed|Error" $OUT/gpu_tests.log | tail -5
  timeout 90 python3 bench/expert_kernels.py --rows 8192,16384 > $OUT/kernels.log 2>&1
  echo "kernels rc=$? t=$(( $(date +%s) - T0 ))"; grep '^{"rows' $OUT/kernels.log
  timeout 200 python3 bench/bench.py --checkpoint $CKPT --seqs 2048,4096 --variants 2048,4096 --quick --graphs \
    --steps 8 --dense-experts 0,1 --out $OUT/bench0.json > $OUT/bench0.log 2>&1
  echo "bench rc=$? t=$(( $(date +%s) - T0 ))"; grep -E '"seq"|loaded' $OUT/bench0.log | cut -c1-220
) > $OUT/gpu0.txt 2>&1 &
( export CUDA_VISIBLE_DEVICES=1
  (cd bench && SEQS=2048,4096 STEPS=5 OUT=$OUT timeout 80 python3 hf_peft_baseline.py > $OUT/hf_peft.log 2>&1)
  echo "hf rc=$? t=$(( $(date +%s) - T0 ))"; grep '^{"seq"' $OUT/hf_peft.log
  timeout 200 python3 bench/bench.py --checkpoint $CKPT --seqs 2048,4096 --variants 2048,4096 --quick --graphs \
    --steps 8 --dense-experts 1,0 --out $OUT/bench1.json > $OUT/bench1.log 2>&1
  echo "bench rc=$? t=$(( $(date +%s) - T0 ))"; grep -E '"seq"|loaded' $OUT/bench1.log | cut -c1-220
) > $OUT/gpu1.txt 2>&1 &
wait
cat $OUT/gpu0.txt; echo ======; cat $OUT/gpu1.txt
grep -B5 -A30 "Error\|FAILED" $OUT/gpu_tests.log | head -60
cd $OUT && tar czf results.tgz --exclude results.tgz * && ls | grep -v -e results.tgz -e gpu0.txt -e gpu1.txt | xargs rm -f
