#!/usr/bin/env bash
# Session 17, call 1 (nvidia-h200-x2), issue 17: kept blocks (no recomputation) against checkpointed ones.
# GPU 0: bench.py attention-only LoRA, kept 0 / 24 / 12, 2k and 4k, graphs; the reference.
# GPU 1: bench.py with expert LoRA, kept 0 / 24; the kept-blocks GPU test; the MLP backward's tiles.
source bench/gpu_session.sh || exit 1
T0=$(date +%s)
(
  export CUDA_VISIBLE_DEVICES=0
  timeout 220 python3 bench/bench.py --checkpoint $CKPT --seqs 2048,4096 --quick --graphs --steps 8 \
    --kept-blocks 0,24,12 --out $OUT/bench_kept.json > $OUT/bench_kept.log 2>&1
  echo "bench kept rc=$? t=$(( $(date +%s) - T0 ))"; grep -E '"seq"|skipped|loaded' $OUT/bench_kept.log | cut -c1-300
  (cd bench && SEQS=2048,4096 STEPS=5 OUT=$OUT timeout 200 python3 hf_peft_baseline.py > $OUT/hf_peft.log 2>&1)
  echo "hf rc=$? t=$(( $(date +%s) - T0 ))"; grep '^{"seq"' $OUT/hf_peft.log
) > $OUT/gpu0.txt 2>&1 &
(
  export CUDA_VISIBLE_DEVICES=1
  timeout 200 python3 bench/bench.py --checkpoint $CKPT --seqs 2048,4096 --quick --graphs --steps 8 \
    --targets q_proj,k_proj,v_proj,o_proj,experts --kept-blocks 0,24 --out $OUT/bench_experts.json > $OUT/bench_experts.log 2>&1
  echo "bench experts rc=$? t=$(( $(date +%s) - T0 ))"; grep -E '"seq"|skipped' $OUT/bench_experts.log | cut -c1-300
  timeout 150 python3 -m pytest -m gpu tests/test_gpu.py -p no:cacheprovider -rA -k "kept or offloaded" > $OUT/gpu_tests.log 2>&1
  echo "gpu tests rc=$? t=$(( $(date +%s) - T0 ))"; grep -E "^(PASSED|FAILED|ERROR)|passed|failed|Error" $OUT/gpu_tests.log | head
  timeout 120 python3 .gpu/mlp_tiles.py > $OUT/mlp_tiles.jsonl 2>&1
  echo "mlp tiles rc=$? t=$(( $(date +%s) - T0 ))"
  python3 - $OUT/mlp_tiles.jsonl <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
for n in (8192, 16384):
    ok = sorted((r for r in rows if r["rows"] == n and "ms" in r), key=lambda r: r["ms"])
    cur = [r for r in ok if r["current"]]
    print(n, "current", cur[:1], "best", ok[:4], "dy unequal", sum(not r["dy_equal"] for r in ok))
PY
) > $OUT/gpu1.txt 2>&1 &
wait
cat $OUT/gpu0.txt; echo ======; cat $OUT/gpu1.txt
cd $OUT && tar czf results.tgz --exclude results.tgz * && ls | grep -v -e results.tgz -e gpu0.txt -e gpu1.txt | xargs rm -f
