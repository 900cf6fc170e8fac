"""The model, tokenizer and adapter that `python -m eval` and `python -m eval.classify` are pointed at.

Mistakes in what the user named end the program with one line saying what to do (SystemExit).
"""
from pathlib import Path

import torch

from data import load_tokenizer, tiny_tokenizer
from model import GptOss, GptOssConfig, load_model
from model.weights.loading import mxfp4_experts


def experts_of(adapter: str | None) -> str:
    """The expert storage to score with: the one the adapter was trained against (train.py --base), else NF4."""
    if adapter is None:
        return "nf4"
    from lora import base_experts  # only this path needs lora/
    try:
        return base_experts(adapter)
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: could not load --adapter {adapter}: {error}") from None


def load(name: str, seed: int, experts: str = "nf4"):
    """(model, tokenizer): the tiny random model on the CPU, or a checkpoint in NF4 on the GPU; the
    experts stored as `experts` says ("nf4" or "mxfp4", as train.py --base)."""
    if name == "tiny":
        torch.manual_seed(seed)  # as train.py builds it: the same seed gives the same weights
        model = GptOss(GptOssConfig.from_name("tiny"))
        return (mxfp4_experts(model) if experts == "mxfp4" else model).eval(), tiny_tokenizer()
    if not torch.cuda.is_available():
        raise SystemExit(f"error: --model {name} needs a CUDA GPU (NF4 weights, bf16 compute) and none "
                         "was found; run on a GPU machine, or pass --model tiny to check the pipeline")
    try:
        model = load_model(name, quantize="nf4", experts=experts)
        tokenizer = load_tokenizer(name)
    except (OSError, ValueError) as error:  # CheckpointError is a ValueError
        raise SystemExit(f"error: could not load --model {name}: {error}") from None
    return model.eval(), tokenizer


def check_adapter(folder: str):
    """Before the slow loading: --adapter must be a folder."""
    if not Path(folder).is_dir():
        raise SystemExit(f"error: --adapter {folder} is not a folder; expected one saved by training "
                         "(<output-dir>/adapter)")


def add_adapter(model, folder: str, name: str, seed: int):
    """Load the adapter in `folder` into the model, in place, refusing one trained on another base."""
    from lora import load_adapter  # only this path needs lora/

    try:
        load_adapter(model, folder, base_model=name, base_seed=seed if name == "tiny" else None)
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: could not load --adapter {folder}: {error}") from None
