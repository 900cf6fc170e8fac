#!/usr/bin/env bash
# Session 20, call 1 (nvidia-h200-x2), issue 17: expert LoRA in the frozen experts' fused layer.
# GPU 0: the GPU tests it touches, then bench.py (dense path off/on in one process): attention-only and
# expert LoRA on this tree, expert LoRA on the old tree (ff36540). GPU 1: the same benches, other order.
source bench/gpu_session.sh || exit 1
T0=$(date +%s)
run() {  # tree targets label
  (cd $1 && timeout 150 python3 bench/bench.py --checkpoint $CKPT --seqs 2048,4096 --graphs --steps 8 --quick \
     --dense-experts 0,1 --targets $2 --out $OUT/$3.json > $OUT/$3.log 2>&1)
  echo "$3 rc=$? t=$(( $(date +%s) - T0 ))"; grep -E '"seq"' $OUT/$3.log | cut -c1-170
}
ATT=q_proj,k_proj,v_proj,o_proj; EXP=$ATT,experts; NEW=$PWD; OLD=$PWD/.gpu/treeOld
( export CUDA_VISIBLE_DEVICES=0
  timeout 200 python3 -m pytest -m gpu tests/test_gpu.py -k "lora or padding or dense or bit_reproducible" -p no:cacheprovider > $OUT/gpu_tests.log 2>&1
  echo "gpu tests rc=$? t=$(( $(date +%s) - T0 ))"; tail -3 $OUT/gpu_tests.log
  run $NEW $EXP lora_new_gpu0; run $OLD $EXP lora_old_gpu0; run $NEW $ATT attn_new_gpu0
) > $OUT/gpu0.txt 2>&1 &
( export CUDA_VISIBLE_DEVICES=1
  run $OLD $EXP lora_old_gpu1; run $NEW $EXP lora_new_gpu1; run $NEW $ATT attn_new_gpu1
) > $OUT/gpu1.txt 2>&1 &
wait
cat $OUT/gpu0.txt; echo ======; cat $OUT/gpu1.txt
grep -E "FAILED|Error" $OUT/gpu_tests.log | head -20
cd $OUT && tar czf results.tgz --exclude results.tgz * && ls | grep -v -e results.tgz -e gpu0.txt -e gpu1.txt | xargs rm -f
