#!/usr/bin/env bash
# One device call's set-up: bitsandbytes from .whl, a random gpt-oss-20b in the hub's MXFP4 layout with
# the real tokenizer (.gpu/tokenizer.json, from ../shared/tools/o200k-tokenizer.sh). Source it:
#   source bench/gpu_session.sh   ->  $CKPT (the checkpoint folder), $DATA (.gpu/jbh, train/val.jsonl)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || return 1
export PYTHONUNBUFFERED=1 CKPT=/tmp/gpt-oss-20b-random DATA=$PWD/.gpu/jbh
if [[ ! -f $CKPT/config.json ]]; then
  python3 bench/make_checkpoint.py $CKPT >/dev/null && cp .gpu/tokenizer.json $CKPT/
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
