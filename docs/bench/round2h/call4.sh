#!/usr/bin/env bash
# Session 19, call 4 (nvidia-h200-x2), issue 17: the dense path with gate_up kept from the recomputation.
# GPU 0: the dequantisation's tiles, the GPU tests again, bench.py dense off/on x kept 0/24.
# GPU 1: transformers + PEFT; expert LoRA dense on/off; embedding on the CPU dense on/off; the user's
# default run (16 GB cap: the plan must not choose the dense path) and train.py under an 80 GB cap.
source bench/gpu_session.sh || exit 1
T0=$(date +%s)
( export CUDA_VISIBLE_DEVICES=0
  timeout 60 python3 bench/dequantize_tiles.py > $OUT/dequantize_tiles.log 2>&1
  echo "tiles rc=$? t=$(( $(date +%s) - T0 ))"; grep '^{' $OUT/dequantize_tiles.log
  timeout 150 python3 -m pytest -m gpu tests/test_gpu.py -p no:cacheprovider -q -x \
    -k "dense or lora_on_the_nf4 or padding_gets or bit_reproducible or kept_blocks" > $OUT/gpu_tests.log 2>&1
  echo "gpu tests rc=$? t=$(( $(date +%s) - T0 ))"; grep -E "passed|failed|Error" $OUT/gpu_tests.log | tail -5
  timeout 200 python3 bench/bench.py --checkpoint $CKPT --seqs 2048,4096 --graphs --quick \
    --steps 8 --kept-blocks 0,24 --dense-experts 0,1 --out $OUT/bench0.json > $OUT/bench0.log 2>&1
  echo "bench rc=$? t=$(( $(date +%s) - T0 ))"; grep -E '"seq"' $OUT/bench0.log | cut -c1-200
) > $OUT/gpu0.txt 2>&1 &
( export CUDA_VISIBLE_DEVICES=1
  (cd bench && SEQS=2048,4096 STEPS=5 OUT=$OUT timeout 80 python3 hf_peft_baseline.py > $OUT/hf_peft.log 2>&1)
  echo "hf rc=$? t=$(( $(date +%s) - T0 ))"; grep '^{"seq"' $OUT/hf_peft.log
  timeout 120 python3 bench/bench.py --checkpoint $CKPT --seqs 2048,4096 --graphs --steps 8 --dense-experts 1,0 \
    --targets q_proj,k_proj,v_proj,o_proj,experts --quick --out $OUT/bench1.json > $OUT/bench1.log 2>&1
  echo "bench experts rc=$? t=$(( $(date +%s) - T0 ))"; grep -E '"seq"' $OUT/bench1.log | cut -c1-200
  timeout 120 python3 bench/bench.py --checkpoint $CKPT --seqs "" --variants 2048,4096 --quick --graphs --steps 8 \
    --dense-experts 1,0 --out $OUT/bench2.json > $OUT/bench2.log 2>&1
  echo "bench emb cpu rc=$? t=$(( $(date +%s) - T0 ))"; grep -E '"seq"' $OUT/bench2.log | cut -c1-200
  timeout 75 bash bench/user_run.sh default_12 --max-steps 12
  echo "t=$(( $(date +%s) - T0 ))"; grep -E "memory plan|experts dequantised|blocks keep" $OUT/default_12.log
  CAP=80 timeout 75 bash bench/user_run.sh cap80_12 --max-steps 12
  echo "t=$(( $(date +%s) - T0 ))"; grep -E "memory plan|experts dequantised|blocks keep" $OUT/cap80_12.log
) > $OUT/gpu1.txt 2>&1 &
wait
cat $OUT/gpu0.txt; echo ======; cat $OUT/gpu1.txt
grep -B5 -A30 "Error\|FAILED" $OUT/gpu_tests.log | head -60
cd $OUT && tar czf results.tgz --exclude results.tgz * && ls | grep -v -e results.tgz -e gpu0.txt -e gpu1.txt | xargs rm -f
