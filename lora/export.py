"""Merge the adapter into the base weights and write a dense checkpoint in the hub's layout.

The result (config.json, model-0000i-of-0000n.safetensors, model.safetensors.index.json) loads in
transformers, vLLM or `model.load_model`. It is written one tensor at a time: each weight is read
from the model (NF4 dequantised), its LoRA update added in float32, cast, appended to its shard
file and dropped. The safetensors header is planned from the shapes first, so a shard is never held
in memory whole; nor is a second copy of the model.
"""
from __future__ import annotations

import json
import math
import os
import struct

import torch
import torch.nn as nn

from model.gpt_oss import hub_shapes

from .layers import LORA_MODULES, LoRAExperts, base_tensor

SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def merged_tensor(model: nn.Module, name: str) -> torch.Tensor:
    """The hub tensor `name` of the model with its adapter folded in (float32 where LoRA adds to it)."""
    path, _, attr = name.rpartition(".")
    module = model.get_submodule(path)
    delta = None
    if isinstance(module, LoRAExperts):
        delta = module.delta_weight(attr) if attr in module.matrices else None
    elif isinstance(module, LORA_MODULES) and attr == "weight":
        delta = module.delta_weight()
    if isinstance(module, LORA_MODULES):
        module = module.base_layer
    t = base_tensor(module, attr).detach()
    if delta is not None:
        t = t.float() + delta.to(t.device)
    return t


def _plan_shards(shapes: dict[str, tuple], itemsize: int, max_shard_bytes: int) -> list[list[str]]:
    """Tensor names in model order, cut into shards of at most max_shard_bytes (or one tensor if larger)."""
    shards, size = [[]], 0
    for name, shape in shapes.items():
        n = math.prod(shape) * itemsize
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def _write_streamed(path: str, names: list[str], shapes: dict[str, tuple], dtype, produce):
    """A safetensors file written tensor by tensor: the header from the shapes, then each tensor's bytes."""
    itemsize = dtype.itemsize
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name in names:
        n = math.prod(shapes[name]) * itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shapes[name]),
                        "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)                          # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name in names:
            t = produce(name).to("cpu", dtype).contiguous()
            assert tuple(t.shape) == tuple(shapes[name]), (name, t.shape, shapes[name])
            f.write(t.view(torch.uint8).numpy())             # raw little-endian bytes, as safetensors wants
            del t


@torch.no_grad()
def export_merged(model: nn.Module, folder: str, dtype=torch.bfloat16, max_shard_bytes: int = 2 * 2**30) -> list[str]:
    """Write base + adapter as a dense checkpoint in the hub's layout; returns the shard file names."""
    if dtype not in SAFETENSORS_DTYPES:
        raise ValueError(f"export dtype must be one of {list(SAFETENSORS_DTYPES)}, not {dtype}")
    shapes = hub_shapes(model.config)
    itemsize = dtype.itemsize
    shards = _plan_shards(shapes, itemsize, max_shard_bytes)
    os.makedirs(folder, exist_ok=True)
    files, weight_map = [], {}
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_streamed(os.path.join(folder, fname), names, shapes, dtype, lambda n: merged_tensor(model, n))
        files.append(fname)
        weight_map.update({n: fname for n in names})
    index = {"metadata": {"total_size": sum(math.prod(s) * itemsize for s in shapes.values())},
             "weight_map": weight_map}
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
    config = model.config.to_dict()
    config.pop("quantization_config", None)                  # the export is dense, whatever the source was
    config["dtype"] = config["torch_dtype"] = str(dtype).removeprefix("torch.")
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return files
