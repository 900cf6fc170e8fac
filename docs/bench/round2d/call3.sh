#!/usr/bin/env bash
# Session 15, call 3 (nvidia-h200-x2). 16's 65k through train.py, frugal flags, the allocator as train.py
# sets it (growable segments; calls 1-2's wrapper had come too late to set it), the plan's headroom 1:
# GPU 0 as train.py runs, GPU 1 with the cache emptied after loading. Then GPU 0: the GPU suite;
# GPU 1: bench.py of round 1's last commit against HEAD (flex unpadded) at 2k and 4k.
source bench/gpu_session.sh || exit 1
T0=$(date +%s)
for g in 0 1; do
  (
    export CUDA_VISIBLE_DEVICES=$g
    extra=""; [[ $g == 1 ]] && extra=--empty-after-load
    QLORA_GPU_MEMORY_GIB=15.58 timeout 170 python3 bench/memory_snapshot.py --out $OUT/oom_$g.pickle --headroom 1.0 $extra -- \
      --model $CKPT --data .gpu/long --rank 16 --output-dir /tmp/runs/L65_$g --max-seq-len 65536 --grad-accum 1 \
      --max-steps 3 --no-eval-base --embedding-on-cpu --offload-activations --lm-head-nf4 --expert-tile 2048 > $OUT/L65_$g.log 2>&1
    echo "L65_$g rc=$? t=$(( $(date +%s) - T0 ))"
    grep -E '^(\{|memory plan|done|GPU memory|error)' $OUT/L65_$g.log | cut -c1-2500
    if [[ $g == 0 ]]; then
      timeout 300 python3 -m pytest -m gpu tests/test_gpu.py tests/test_mxfp4.py -q -p no:cacheprovider > $OUT/gpu_tests.log 2>&1
      echo "gpu tests rc=$? t=$(( $(date +%s) - T0 ))"; tail -6 $OUT/gpu_tests.log
    else
      for v in old new; do
        dir=.; [[ $v == old ]] && dir=.gpu/old
        (cd $dir && timeout 150 python3 bench/bench.py --checkpoint $CKPT --seqs 2048,4096 --quick --graphs --steps 8 \
          --out $OUT/bench_$v.json) > $OUT/bench_$v.log 2>&1
        echo "bench $v rc=$? t=$(( $(date +%s) - T0 ))"; grep -iE 'tok_s' $OUT/bench_$v.log | tail -2
      done
    fi
  ) > $OUT/gpu$g.txt 2>&1 &
done
wait
cat $OUT/gpu0.txt; echo ======; cat $OUT/gpu1.txt
cd $OUT && tar czf results.tgz --exclude results.tgz * && ls | grep -v -e results.tgz -e gpu0.txt -e gpu1.txt | xargs rm -f
