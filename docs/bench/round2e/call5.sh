#!/usr/bin/env bash
# Session 16, call 5 (nvidia-h200-x2), issue 17: the NF4 kernels' tiles again (8 warps for the forward's
# 128 x 128 tile, not tried before), now that the transposed kernel pipelines. GPU 0: 8,192 rows; GPU 1: 16,384.
source bench/gpu_session.sh || exit 1
for g in 0 1; do
  rows=$(( 8192 * (g + 1) ))
  (cd bench && CUDA_VISIBLE_DEVICES=$g timeout 200 python3 tune_nf4_gemm.py --rows $rows --out $OUT/tune_$rows.json > $OUT/tune_$rows.log 2>&1) &
done
wait
for f in $OUT/tune_*.log; do echo $f; python3 - $f <<'PY'
import json, sys
for l in open(sys.argv[1]):
    if l.startswith("{"):
        r = json.loads(l)
        t = r.get("tiles"); print(tuple(t.values()) if t else "", {k: v for k, v in r.items() if k.endswith("ms") or k == "error" or k == "proj"})
PY
done
cd $OUT && tar czf results.tgz --exclude results.tgz * && ls | grep -v results.tgz | xargs rm -f
