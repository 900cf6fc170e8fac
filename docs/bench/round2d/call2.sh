#!/usr/bin/env bash
# Session 15, call 2 (nvidia-h200-x2), after flex stopped padding (copying) q, k, v at multiples of 128.
# GPU 0: 14's evaluation at 2,000 prompts again, each forward timed by size, recompiles logged;
#        16's 65k through train.py with the frugal flags the bench used (plan's headroom 1 to let it try);
#        then the GPU suite (flex, the restructured NF4/MXFP4 tests).
# GPU 1: 16's memory sweep (refit after the change) and the 65k bench under the 16 GB cap.
source bench/gpu_session.sh || exit 1
T0=$(date +%s)
(
  export CUDA_VISIBLE_DEVICES=0
  TORCH_LOGS=recompiles QLORA_GPU_MEMORY_GIB=15.58 timeout 170 python3 bench/eval_timing.py --random gpt-oss-20b \
    --checkpoint .gpu/tokenizer.json --data .gpu/jbh2k/val.jsonl --n 2000 --rows 1 --per-forward > $OUT/eval_timing.log 2>&1
  echo "eval rc=$? t=$(( $(date +%s) - T0 ))"; grep '^{' $OUT/eval_timing.log || tail -5 $OUT/eval_timing.log
  grep -ci recompil $OUT/eval_timing.log
  QLORA_GPU_MEMORY_GIB=15.58 timeout 170 python3 bench/memory_snapshot.py --out $OUT/oom_frugal.pickle --headroom 1.0 -- \
    --model $CKPT --data .gpu/long --rank 16 --output-dir /tmp/runs/L65f --max-seq-len 65536 --grad-accum 1 \
    --max-steps 3 --no-eval-base --embedding-on-cpu --offload-activations --lm-head-nf4 --expert-tile 2048 > $OUT/L65f.log 2>&1
  echo "L65f rc=$? t=$(( $(date +%s) - T0 ))"
  grep -E '^(\{|memory plan|done|GPU memory|error)' $OUT/L65f.log | cut -c1-2500
  timeout 270 python3 -m pytest -m gpu tests/test_gpu.py tests/test_mxfp4.py -q -x -p no:cacheprovider > $OUT/gpu_tests.log 2>&1
  echo "gpu tests rc=$? t=$(( $(date +%s) - T0 ))"; tail -4 $OUT/gpu_tests.log
) > $OUT/gpu0.txt 2>&1 &
(
  export CUDA_VISIBLE_DEVICES=1
  timeout 330 python3 bench/big_memory.py --model gpt-oss-20b --sweep 2048,8192,32768,131072 --steps 2 > $OUT/sweep.log 2>&1
  echo "sweep rc=$? t=$(( $(date +%s) - T0 ))"; cut -c1-700 $OUT/sweep.log | grep '^{'
  timeout 150 python3 bench/big_memory.py --model gpt-oss-20b --seq-len 65536 --cap-gib 15.58 --steps 2 --offload on \
    --embedding-on-cpu on --lm-head-nf4 on --tile 2048 > $OUT/b65.log 2>&1
  echo "b65 rc=$? t=$(( $(date +%s) - T0 ))"; cut -c1-900 $OUT/b65.log | grep '^{'
) > $OUT/gpu1.txt 2>&1 &
wait
cat $OUT/gpu0.txt; echo ======; cat $OUT/gpu1.txt
cd $OUT && tar czf results.tgz --exclude results.tgz * && ls | grep -v -e results.tgz -e gpu0.txt -e gpu1.txt | xargs rm -f
