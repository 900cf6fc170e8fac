#!/usr/bin/env bash
# Session 19, call 6 (nvidia-h200-x2), issue 17: A/B of the dense path's kept copy, every tree on each GPU,
# the two GPUs in opposite orders. Trees: A = 310e8ea with no copy kept (every product dequantises);
# B = 310e8ea (gate_up's copy kept from the fused layer's recomputation only); C = HEAD (the first copy
# of any recomputation kept: expert LoRA's too). Attention-only: A against C (B is C there);
# expert LoRA: B against C (A is B there). Dense path on, kept 0, graphed.
source bench/gpu_session.sh || exit 1
T0=$(date +%s)
# Trees (made on the CPU before the call): mkdir -p .gpu/treeA .gpu/treeB; git archive 310e8ea | tar -x -C .gpu/treeB;
# git archive 310e8ea | tar -x -C .gpu/treeA; in .gpu/treeA/model/fast/dense_gemm.py the line
# "self.kept = (w, weights) if in_recomputation() else None" made "self.kept = None".
run() {  # tree targets label
  (cd $1 && timeout 100 python3 bench/bench.py --checkpoint $CKPT --seqs 2048,4096 --graphs --steps 8 --quick \
     --dense-experts 1 --targets $2 --out $OUT/$3.json > $OUT/$3.log 2>&1)
  echo "$3 rc=$? t=$(( $(date +%s) - T0 ))"; grep -E '"seq"' $OUT/$3.log | cut -c1-160
}
ATT=q_proj,k_proj,v_proj,o_proj; EXP=$ATT,experts; C=$PWD; A=$PWD/.gpu/treeA; B=$PWD/.gpu/treeB
( export CUDA_VISIBLE_DEVICES=0
  run $A $ATT attn_A_gpu0; run $C $ATT attn_C_gpu0; run $B $EXP lora_B_gpu0; run $C $EXP lora_C_gpu0
) > $OUT/gpu0.txt 2>&1 &
( export CUDA_VISIBLE_DEVICES=1
  run $C $EXP lora_C_gpu1; run $B $EXP lora_B_gpu1; run $C $ATT attn_C_gpu1; run $A $ATT attn_A_gpu1
) > $OUT/gpu1.txt 2>&1 &
wait
cat $OUT/gpu0.txt; echo ======; cat $OUT/gpu1.txt
cd $OUT && tar czf results.tgz --exclude results.tgz * && ls | grep -v -e results.tgz -e gpu0.txt -e gpu1.txt | xargs rm -f
