#!/usr/bin/env bash
# Session 21, call 5 (nvidia-h200-x2), issue 17: why the graphed step takes longer than an eager step's
# kernels (call 4: 10-12 ms at 2,048 tokens, 26-41 at 4,096). GPU 0: the step's profile replayed as a CUDA
# graph (profile_step.py --graphs) and eager, dense path, at 2,048 and 4,096 tokens; GPU 1: bench.py's
# graphed steps. nvidia-smi samples each GPU's SM clock and power every 100 ms meanwhile.
source bench/gpu_session.sh || exit 1
T0=$(date +%s)
nvidia-smi --query-gpu=timestamp,index,clocks.sm,clocks.max.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active \
  --format=csv,noheader -lms 100 > $OUT/smi.csv 2>&1 &
SMI=$!
( export CUDA_VISIBLE_DEVICES=0
  for seq in 2048 4096; do
    for mode in --graphs ""; do
      echo "start profile $seq $mode $(date +%H:%M:%S.%N)"
      timeout 120 python3 bench/profile_step.py --checkpoint $CKPT --seq $seq --kernels 25 --dense-experts $mode \
        > $OUT/profile_${seq}${mode}.log 2>&1
      echo "profile $seq $mode rc=$? t=$(( $(date +%s) - T0 )) $(date +%H:%M:%S.%N)"; grep -E '^\{"seq|^seq' $OUT/profile_${seq}${mode}.log | cut -c1-1500
    done
  done
) > $OUT/gpu0.txt 2>&1 &
P0=$!
( export CUDA_VISIBLE_DEVICES=1
  echo "start bench $(date +%H:%M:%S.%N)"
  timeout 120 python3 bench/bench.py --checkpoint $CKPT --seqs 2048,4096 --graphs --steps 30 --dense-experts 1 \
     --out $OUT/bench_dense.json > $OUT/bench_dense.log 2>&1
  echo "bench rc=$? t=$(( $(date +%s) - T0 )) $(date +%H:%M:%S.%N)"; grep -E '"seq"' $OUT/bench_dense.log | cut -c1-170
) > $OUT/gpu1.txt 2>&1 &
P1=$!
wait $P0 $P1
kill $SMI
cat $OUT/gpu0.txt; echo ======; cat $OUT/gpu1.txt
python3 - $OUT/smi.csv <<'PY'
import sys, collections
rows = [l.strip().split(", ") for l in open(sys.argv[1]) if l.count(",") >= 6]
by = collections.defaultdict(list)
for r in rows:
    by[r[1]].append(r)
for gpu, rs in by.items():
    busy = [r for r in rs if float(r[4].split()[0]) > 300]
    print(f"GPU {gpu}: {len(rs)} samples, {len(busy)} above 300 W; SM MHz there min/median/max",
          min(int(r[2].split()[0]) for r in busy) if busy else "-",
          sorted(int(r[2].split()[0]) for r in busy)[len(busy) // 2] if busy else "-",
          max(int(r[2].split()[0]) for r in busy) if busy else "-", "of", rs[0][3],
          "; power max", max(float(r[4].split()[0]) for r in rs), "W; reasons", collections.Counter(r[6] for r in busy).most_common(4))
PY
cd $OUT && tar czf results.tgz --exclude results.tgz * && ls | grep -v -e results.tgz -e gpu0.txt -e gpu1.txt | xargs rm -f
