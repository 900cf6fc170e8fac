#!/usr/bin/env bash
# Session 16, call 3 (nvidia-h200-x2), issue 17.
# GPU 0: NF4 forward variants (the transposed forward, K a constexpr, at several tiles) against the kernel.
# GPU 1: MXFP4 against NF4 after the constexpr change (issue 17 part 2's figures).
source bench/gpu_session.sh || exit 1
T0=$(date +%s)
(
  export CUDA_VISIBLE_DEVICES=0
  cd bench && timeout 300 python3 nf4_variants.py --rows 8192,16384 --out $OUT/variants.json > $OUT/variants.log 2>&1
  echo "variants rc=$? t=$(( $(date +%s) - T0 ))"
) > $OUT/gpu0.txt 2>&1 &
(
  export CUDA_VISIBLE_DEVICES=1
  timeout 300 python3 bench/mxfp4_vs_nf4.py --out $OUT/mxfp4_vs_nf4.json > $OUT/mxfp4_vs_nf4.log 2>&1
  echo "mxfp4 rc=$? t=$(( $(date +%s) - T0 ))"; grep '^{' $OUT/mxfp4_vs_nf4.log | cut -c1-400
) > $OUT/gpu1.txt 2>&1 &
wait
cat $OUT/gpu0.txt
python3 - <<'PY'
import json, os
for l in open(os.environ["OUT"] + "/variants.log"):
    if l.startswith("{"):
        r = json.loads(l); print(r.get("rows"), r.get("proj"), r["variant"], r.get("tiles", ""), r.get("ms"), r.get("TFLOPs"),
              {k: v for k, v in r.items() if "differ" in k or k == "error"})
PY
echo ======; cat $OUT/gpu1.txt
cd $OUT && tar czf results.tgz --exclude results.tgz * && ls | grep -v -e results.tgz -e gpu0.txt -e gpu1.txt | xargs rm -f
