#!/usr/bin/env bash
# The user's own run on a 16 GB card, emulated: train.py with default flags (the model and data
# pointed at the random 20b and the JailbreakHub-shaped folder), the GPU capped at 15.58 GiB.
# Writes logs and adapters' digests under $OUT. Usage (device): bash bench/user_run.sh NAME [flags...]
set -o pipefail
name=$1; shift
dir=${DIR:-/tmp/runs/$name}
start=$(date +%s.%N)
QLORA_GPU_MEMORY_GIB=${CAP:-15.58} python3 train.py --model $CKPT --data $DATA --rank 16 --output-dir $dir "$@" \
  > $OUT/$name.log 2>&1
rc=$?
end=$(date +%s.%N)
echo "$name rc=$rc wall=$(python3 -c "print(round($end-$start,1))")s $(grep -E '^(done|GPU memory|memory plan|step:)' $OUT/$name.log | tr '\n' ' ')"
python3 - $dir <<'PY' >> $OUT/$name.log
import json, sys, statistics
rows = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl")]
train = [r for r in rows if r["kind"] == "train"]
if train:
    tok = sum(r["tokens"] for r in train)
    secs = sum(r["tokens"] / r["tokens_per_second"] for r in train)
    examples = len(train) * 8       # the default 2 x 4 per step; 320 examples make 40 whole steps an epoch
    first = train[0]
    print(f"SUMMARY steps {len(train)} examples {examples} real-tokens {tok} train-seconds {secs:.1f} "
          f"examples/s {examples/secs:.2f} real-tok/s {tok/secs:.0f} "
          f"first-step-done-at-s {first.get('elapsed', float('nan')):.1f} (its step {first['tokens']/first['tokens_per_second']:.1f} s) "
          f"median-step-tok/s {statistics.median(r['tokens_per_second'] for r in train):.0f} "
          f"run-elapsed-s {rows[-1].get('elapsed', float('nan')):.1f}")
PY
tail -1 $OUT/$name.log
cat $dir/metrics.jsonl >> $OUT/$name.log 2>/dev/null
