#!/usr/bin/env bash
# Is a train.py run the same in fresh processes? Runs it N times (bench/user_run.sh, so capped and logged
# as there), each a new process with a new Inductor cache, then prints each run's first-step loss and
# compares every adapter with the first, bit for bit. Flags after N go to train.py: switch fast paths off
# (--cuda-graphs off, --kernels plain, ...) to find which one makes runs differ. On the device, after
# `source bench/gpu_session.sh`:
#   bash bench/fresh_runs.sh R 3 --epochs 1
#   bash bench/fresh_runs.sh G 3 --epochs 1 --cuda-graphs off
#   TORCHINDUCTOR_DETERMINISTIC=1 bash bench/fresh_runs.sh D 4 --max-steps 5
# (the last: Inductor's deterministic mode, which stops it benchmarking reduction configs in each process,
# where near-tied winners can flip the bits (pytorch/pytorch#189121); the lead for the per-process
# difference in the README's Reproducible, not yet tried on a GPU)
set -o pipefail
name=$1; n=$2; shift 2
for i in $(seq 1 "$n"); do
  TORCHINDUCTOR_CACHE_DIR=/tmp/inductor_${name}_$i bash bench/user_run.sh "${name}$i" "$@" > /dev/null
  printf '%s%s first step: ' "$name" "$i"
  grep -m1 '"step": 1,' "$OUT/${name}$i.log" | python3 -c "import json, sys; print(json.load(sys.stdin)['loss'])"
done
for i in $(seq 2 "$n"); do
  python3 bench/same_adapters.py "/tmp/runs/${name}1/adapter/adapter_model.safetensors" \
    "/tmp/runs/${name}$i/adapter/adapter_model.safetensors"
done
