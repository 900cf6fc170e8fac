#!/usr/bin/env bash
# The user's own run on a 16 GB card, emulated: train.py with default flags (the model and data
# pointed at the random 20b and the JailbreakHub-shaped folder), the GPU capped at 15.58 GiB.
# Writes logs and adapters' digests under $OUT. Usage (device): bash bench/user_run.sh NAME [flags...]
# EX: examples an optimizer step takes (default 8, train.py's 2 x 4); LAUNCH: what runs train.py
# (default python3; e.g. "torchrun --standalone --nproc-per-node 2"); DIR, CAP: the run folder and the cap.
set -o pipefail
name=$1; shift
dir=${DIR:-/tmp/runs/$name}
start=$(date +%s.%N)
QLORA_GPU_MEMORY_GIB=${CAP:-15.58} ${LAUNCH:-python3} train.py --model $CKPT --data $DATA --rank 16 --output-dir $dir "$@" \
  > $OUT/$name.log 2>&1
rc=$?
end=$(date +%s.%N)
echo "$name rc=$rc wall=$(python3 -c "print(round($end-$start,1))")s $(grep -E '^(done|GPU memory|memory plan|step:)' $OUT/$name.log | tr '\n' ' ')"
python3 - $dir ${EX:-8} <<'PY' >> $OUT/$name.log
import json, sys, statistics
rows = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl")]
train = [r for r in rows if r["kind"] == "train"]
if train:
    tok = sum(r["tokens"] for r in train)
    slots = sum(r.get("row_tokens", 0) for r in train)
    secs = sum(r["tokens"] / r["tokens_per_second"] for r in train)
    examples = len(train) * int(sys.argv[2])   # whole steps: 320 examples at 8 or 64 a step
    first = train[0]
    rest = train[1:]
    rest_secs = sum(r["tokens"] / r["tokens_per_second"] for r in rest)
    print(f"SUMMARY steps {len(train)} examples {examples} real-tokens {tok} train-seconds {secs:.1f} "
          f"examples/s {examples/secs:.2f} real-tok/s {tok/secs:.0f} "
          f"first-step-done-at-s {first.get('elapsed', float('nan')):.1f} (its step {first['tokens']/first['tokens_per_second']:.1f} s) "
          f"median-step-tok/s {statistics.median(r['tokens_per_second'] for r in train):.0f} "
          f"steady-examples/s {len(rest) * int(sys.argv[2]) / rest_secs:.2f} steady-real-tok/s {sum(r['tokens'] for r in rest) / rest_secs:.0f} "
          f"padding-share {1 - tok / slots if slots else float('nan'):.3f} "
          f"run-elapsed-s {rows[-1].get('elapsed', float('nan')):.1f} "
          f"whole-run-examples/s {examples / rows[-1].get('elapsed', float('nan')):.2f}")
PY
tail -1 $OUT/$name.log
cat $dir/metrics.jsonl >> $OUT/$name.log 2>/dev/null
