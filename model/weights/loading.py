"""Load gpt-oss from a checkpoint in the hub's transformers layout, one tensor at a time.

The model is first built on the meta device (no memory); then each tensor is read lazily from its
safetensors file, dequantised from MXFP4 if the checkpoint stores it so, moved to the target device,
quantised to NF4 if asked, put in place, and dropped before the next one is read. No full copy of
the weights ever exists beside the finished model. With `experts="mxfp4"` the experts stay in the
MXFP4 codes of an MXFP4 checkpoint, never dequantised (from a BF16 checkpoint they are quantised to
MXFP4 on load).
"""
from __future__ import annotations

import json
import os
import re

import torch
import torch.nn as nn
from safetensors import safe_open

from ..config import GptOssConfig
from ..gpt_oss import GptOss, hub_shapes
from ..moe import EXPERT_MATRICES
from .mxfp4 import MXFP4Experts, dequantize_mxfp4, quantize_mxfp4
from .nf4 import NF4Experts, NF4Linear

NF4_LINEARS = re.compile(r"model\.layers\.\d+\.self_attn\.[qkvo]_proj$")
EXPERT_SUFFIXES = tuple(f"experts.{m}" for m in EXPERT_MATRICES)


class CheckpointError(ValueError):
    """A checkpoint that is not gpt-oss in the hub's layout; the message names the file and tensor."""


def resolve_checkpoint(path_or_hub_id: str) -> str:
    """A local folder as is; otherwise download (or find in the cache) only the files we read."""
    if os.path.isdir(path_or_hub_id):
        return path_or_hub_id
    if os.path.exists(path_or_hub_id):
        raise CheckpointError(f"{path_or_hub_id} is a file; expected a checkpoint folder or a hub id")
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(path_or_hub_id, allow_patterns=[
            "config.json", "model.safetensors.index.json", "model*.safetensors"])
    except Exception as e:  # offline, unknown repo, no access: say what we needed
        raise CheckpointError(
            f"could not get {path_or_hub_id!r} from the hub ({type(e).__name__}: {e}). "
            "Pass a local folder holding config.json and *.safetensors in the hub's layout, "
            "or use --model tiny for a small random model.") from e


def checkpoint_files(folder: str) -> dict[str, str]:
    """Tensor name -> safetensors file, from the shard index or the single file."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {k: os.path.join(folder, v) for k, v in weight_map.items()}
    files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"{folder} holds no *.safetensors files")
    out = {}
    for name in files:
        path = os.path.join(folder, name)
        with safe_open(path, "pt") as f:
            out.update({k: path for k in f.keys()})
    return out


def _quant_method(config: GptOssConfig, folder: str) -> str | None:
    q = config.quantization_config
    if not q:
        return None
    method = q.get("quant_method")
    if method != "mxfp4":
        raise CheckpointError(f"{folder}/config.json: quantization {method!r} is not supported "
                              "(expected none, i.e. bf16, or mxfp4)")
    return method


def _skeleton(config: GptOssConfig, quantize: str | None, experts: str | None, lm_head_nf4: bool, attention: str,
              experts_per_group: int | None) -> GptOss:
    with torch.device("meta"):
        model = GptOss(config, attention=attention)
        if quantize == "nf4":
            for name, module in list(model.named_modules()):
                if NF4_LINEARS.search(name) or (lm_head_nf4 and name == "lm_head"):
                    bias = module.bias.detach() if module.bias is not None else None
                    model.set_submodule(name, NF4Linear(module.in_features, module.out_features, bias))
        for layer in model.model.layers:
            if experts == "nf4":
                layer.mlp.experts = NF4Experts(config, experts_per_group)
            elif experts == "mxfp4":
                layer.mlp.experts = MXFP4Experts(config)
    return model


def _get(files: dict[str, str], key: str, device) -> torch.Tensor:
    with safe_open(files[key], "pt", device="cpu") as f:
        return f.get_tensor(key).to(device)


def _read(files: dict[str, str], name: str, device, dtype) -> torch.Tensor:
    """One tensor, in the dense layout, on `device`; MXFP4 pairs are dequantised there."""
    if name in files:
        t = _get(files, name, device)
        return t.to(dtype) if t.is_floating_point() else t
    blocks, scales = f"{name}_blocks", f"{name}_scales"
    if scales not in files:
        raise CheckpointError(f"{files[blocks]}: {blocks} has no {scales} in the checkpoint")
    w = dequantize_mxfp4(_get(files, blocks, device), _get(files, scales, device), dtype)
    return w.transpose(1, 2).contiguous()  # stored (experts, out, in); dense layout is (experts, in, out)


def load_model(path_or_hub_id: str, quantize: str | None = None, device=None, dtype=torch.bfloat16,
               embedding_device=None, lm_head_nf4: bool = False, attention: str = "auto",
               experts_per_group: int | None = None, experts: str | None = None) -> GptOss:
    """gpt-oss from a local folder or hub id, BF16 or MXFP4 checkpoint.

    quantize: None keeps every weight in `dtype`; "nf4" stores the attention projections and the
    experts (and the lm_head with lm_head_nf4) in NF4. experts: how the experts are stored, None
    (as `quantize` says), "nf4" or "mxfp4" (the checkpoint's MXFP4 codes as they are; a BF16
    checkpoint's experts quantised to MXFP4). embedding_device: where the embedding lives
    (e.g. "cpu" to save GPU memory); default `device`. experts_per_group: NF4 experts are quantised
    and dequantised this many at a time (default all: fastest; fewer: less transient memory).
    """
    if quantize not in (None, "nf4"):
        raise ValueError(f"quantize must be None or 'nf4', not {quantize!r}")
    if experts not in (None, "nf4", "mxfp4"):
        raise ValueError(f"experts must be None, 'nf4' or 'mxfp4', not {experts!r}")
    experts = experts or quantize
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    embedding_device = torch.device(embedding_device or device)
    folder = resolve_checkpoint(path_or_hub_id)
    config = GptOssConfig.from_pretrained(folder)
    mxfp4 = _quant_method(config, folder) == "mxfp4"
    files = checkpoint_files(folder)
    shapes = hub_shapes(config)
    model = _skeleton(config, quantize, experts, lm_head_nf4, attention, experts_per_group)
    if experts == "mxfp4":
        print("experts: MXFP4, " + ("the checkpoint's codes as they are" if mxfp4 else
                                    "quantised to MXFP4 on load from the checkpoint's dense weights"))

    # tensor names as the dense model knows them (MXFP4 pairs fold into one name)
    wanted: dict[str, str] = {}
    for key, path in files.items():
        name = re.sub(r"_(blocks|scales)$", "", key) if mxfp4 else key
        if name not in shapes:
            raise CheckpointError(f"{path}: unexpected tensor {key!r} (not part of gpt-oss with this config.json)")
        wanted[name] = path
    missing = sorted(set(shapes) - set(wanted))
    if missing:
        raise CheckpointError(f"{folder}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")

    for name, path in wanted.items():  # one tensor at a time: read, convert, place, drop
        target = embedding_device if name == "model.embed_tokens.weight" else device
        if experts == "mxfp4" and name.endswith(EXPERT_SUFFIXES):   # kept in (or quantised to) MXFP4
            _place_mxfp4(model, files, name, path, target, shapes[name], mxfp4, dtype)
            continue
        t = _read(files, name, target, dtype)
        if tuple(t.shape) != shapes[name]:
            raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(t.shape)}, "
                                  f"expected {shapes[name]} from config.json")
        _place(model, name, t, dtype)
        del t
    return model


def mxfp4_experts(model: GptOss) -> GptOss:
    """A model built in memory (the tiny one) with its dense experts quantised to MXFP4, in place, as
    load_model(experts="mxfp4") does for a BF16 checkpoint; says so in one line."""
    for layer in model.model.layers:
        dense = layer.mlp.experts
        experts = MXFP4Experts(model.config).to(dense.gate_up_proj_bias.device)
        experts.load_state_dict(dense.state_dict(), strict=False)            # the biases
        for name in EXPERT_MATRICES:
            weight = getattr(dense, name).detach()
            experts.set_weight(name, weight, weight.dtype)
        layer.mlp.experts = experts
    print("experts: MXFP4, quantised from the model's own weights")
    return model


def _place_mxfp4(model: GptOss, files, name: str, path: str, device, shape, mxfp4: bool, dtype):
    """An expert matrix into MXFP4Experts: the checkpoint's blocks and scales, or its bf16 quantised."""
    if mxfp4:
        if f"{name}_scales" not in files or f"{name}_blocks" not in files:
            raise CheckpointError(f"{path}: {name} needs both _blocks and _scales in the checkpoint")
        blocks, scales = _get(files, f"{name}_blocks", device), _get(files, f"{name}_scales", device)
    else:
        blocks, scales = quantize_mxfp4(_get(files, name, device).transpose(1, 2))  # stored (experts, out, in)
    e, n_in, n_out = shape
    if tuple(blocks.shape) != (e, n_out, n_in // 32, 16) or tuple(scales.shape) != (e, n_out, n_in // 32):
        raise CheckpointError(f"{path}: MXFP4 tensor {name!r} has blocks {tuple(blocks.shape)} and scales "
                              f"{tuple(scales.shape)}, expected {(e, n_out, n_in // 32, 16)} and "
                              f"{(e, n_out, n_in // 32)} from config.json")
    module_name, _, attr = name.rpartition(".")
    model.get_submodule(module_name).set_mxfp4(attr, blocks, scales, dtype)


def _place(model: GptOss, name: str, t: torch.Tensor, dtype):
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if isinstance(module, NF4Linear) and attr == "weight":
        module.set_weight(t, dtype)
    elif isinstance(module, NF4Experts) and attr in EXPERT_MATRICES:
        module.set_weight(attr, t, dtype)
    elif isinstance(module, NF4Linear):  # its bias: frozen, kept as is
        module.bias = nn.Parameter(t, requires_grad=False)
    else:
        old = module._parameters[attr]
        module._parameters[attr] = nn.Parameter(t, requires_grad=old.requires_grad)
