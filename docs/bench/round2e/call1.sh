#!/usr/bin/env bash
# Session 16, call 1 (nvidia-h200-x2), issue 17.
# GPU 0: the kernel variants of bench/nf4_variants.py against the current kernels, 8,192 and 16,384 rows.
# GPU 1: the step as it is (attention-only LoRA and expert LoRA), and the reference (transformers + PEFT).
source bench/gpu_session.sh || exit 1
T0=$(date +%s)
(
  export CUDA_VISIBLE_DEVICES=0
  cd bench && timeout 400 python3 nf4_variants.py --rows 8192,16384 --out $OUT/variants.json > $OUT/variants.log 2>&1
  echo "variants rc=$? t=$(( $(date +%s) - T0 ))"
) > $OUT/gpu0.txt 2>&1 &
(
  export CUDA_VISIBLE_DEVICES=1
  timeout 150 python3 bench/bench.py --checkpoint $CKPT --seqs 2048,4096 --quick --graphs --steps 8 --out $OUT/bench_attn.json > $OUT/bench_attn.log 2>&1
  echo "bench attn rc=$? t=$(( $(date +%s) - T0 ))"; grep '"seq"' $OUT/bench_attn.log
  timeout 150 python3 bench/bench.py --checkpoint $CKPT --seqs 2048,4096 --quick --graphs --steps 8 \
    --targets q_proj,k_proj,v_proj,o_proj,experts --out $OUT/bench_experts.json > $OUT/bench_experts.log 2>&1
  echo "bench experts rc=$? t=$(( $(date +%s) - T0 ))"; grep -E '"seq"|skipped' $OUT/bench_experts.log
  (cd bench && SEQS=2048,4096 STEPS=5 OUT=$OUT timeout 200 python3 hf_peft_baseline.py > $OUT/hf_peft.log 2>&1)
  echo "hf rc=$? t=$(( $(date +%s) - T0 ))"; tail -3 $OUT/hf_peft.log
) > $OUT/gpu1.txt 2>&1 &
wait
cat $OUT/gpu0.txt; grep -v '^{"variant": "fwd\|^{"variant": "dx' $OUT/variants.log | tail -5
python3 - <<'PY'
import json, os
for l in open(os.environ["OUT"] + "/variants.log"):
    if l.startswith("{") and "ms" in l:
        r = json.loads(l); print(r.get("rows"), r.get("proj"), r["variant"], r.get("tiles", ""), r.get("ms"), r.get("TFLOPs"),
              {k: v for k, v in r.items() if "differ" in k or k == "error"})
PY
echo ======; cat $OUT/gpu1.txt
cd $OUT && tar czf results.tgz --exclude results.tgz * && ls | grep -v -e results.tgz -e gpu0.txt -e gpu1.txt | xargs rm -f
