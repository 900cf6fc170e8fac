"""Adapter files in PEFT's layout: adapter_model.safetensors + adapter_config.json.

`peft.PeftModel.from_pretrained(GptOssForCausalLM, folder)` loads what `save_adapter` writes, and
`load_adapter` reads what PEFT saves for gpt-oss. Keys are `base_model.model.<module>.lora_A.weight`
(rank, in) and `.lora_B.weight` (out, rank). The router and the experts are PEFT `target_parameters`
(a `ParamWrapper` per parameter). For an expert matrix (experts, in, out) PEFT keeps one
lora_A (experts*rank, in), rows expert-major, and one lora_B (out, rank*experts), columns
expert-minor: expert e's update is (B[:, e::experts] @ A[e*rank:(e+1)*rank]) * scaling, transposed
into the (in, out) layout - one independent A/B pair per expert, exactly ours, packed differently. With both expert matrices targeted PEFT nests
the wrappers in the experts' parameter order: gate_up_proj's keys get an extra `base_layer.`.
"""
from __future__ import annotations

import json
import os
import warnings

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from .inject import inject
from .layers import LORA_MODULES, LoRAExperts, LoRALinear, LoRARouter

PREFIX = "base_model.model."
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


# --------------------------------------------------------------- our tensors <-> PEFT's
def _same(t, like=None):
    return t


def _experts_A_to_peft(a):          # (experts, in, rank) -> (experts*rank, in)
    e, n_in, r = a.shape
    return a.transpose(1, 2).reshape(e * r, n_in)


def _experts_B_to_peft(b):          # (experts, rank, out) -> (out, rank*experts)
    e, r, n_out = b.shape
    return b.permute(2, 1, 0).reshape(n_out, r * e)


def _experts_A_from_peft(a, like):  # (experts*rank, in) -> (experts, in, rank)
    e, n_in, r = like.shape
    return a.reshape(e, r, n_in).transpose(1, 2)


def _experts_B_from_peft(b, like):  # (out, rank*experts) -> (experts, rank, out)
    e, r, n_out = like.shape
    return b.reshape(n_out, r, e).permute(2, 1, 0)


def _entries(model: nn.Module):
    """(PEFT key, our parameter, to PEFT's layout, from PEFT's layout) for every adapter tensor."""
    for path, module in model.named_modules():
        if isinstance(module, (LoRALinear, LoRARouter)):
            yield f"{PREFIX}{path}.lora_A.weight", module.lora_A, _same, _same
            yield f"{PREFIX}{path}.lora_B.weight", module.lora_B, _same, _same
        elif isinstance(module, LoRAExperts):
            for name in module.matrices:
                nest = "base_layer." if name == "gate_up_proj" and len(module.matrices) == 2 else ""
                yield (f"{PREFIX}{path}.{nest}lora_A.weight", module.lora_A[name],
                       _experts_A_to_peft, _experts_A_from_peft)
                yield (f"{PREFIX}{path}.{nest}lora_B.weight", module.lora_B[name],
                       _experts_B_to_peft, _experts_B_from_peft)


def adapter_config(model: nn.Module, base_model: str | None = None, base_seed: int | None = None,
                   base_experts: str | None = None) -> dict:
    """adapter_config.json for PEFT's LoraConfig, from `model.lora_config` and the base it was trained on."""
    c = model.lora_config
    params = c["target_parameters"]
    if base_model is not None and base_seed is None and os.path.exists(os.path.expanduser(base_model)):
        base_model = os.path.abspath(os.path.expanduser(base_model))  # a folder means the same from anywhere
    # "base_model_seed" is ours (PEFT ignores it): a random base such as 'tiny' is known by its seed
    seed = {} if base_seed is None else {"base_model_seed": base_seed}
    # ours too: how the frozen experts were stored in training (train.py --base), so eval scores that base
    seed |= {} if base_experts is None else {"base_model_experts": base_experts}
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, **seed,
        "r": c["r"], "lora_alpha": c["lora_alpha"], "use_rslora": c["use_rslora"],
        # PEFT refuses dropout with target_parameters (it changes the weight, not the input); dropout
        # is a training-time choice and does not change what the adapter computes at inference
        "lora_dropout": 0.0 if params else c["lora_dropout"],
        "target_modules": c["target_modules"] or None, "target_parameters": params or None,
        "bias": "none", "lora_bias": False, "use_dora": False, "fan_in_fan_out": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "rank_pattern": {}, "alpha_pattern": {},
    }


def save_adapter(model: nn.Module, folder: str, base_model: str | None = None, base_seed: int | None = None,
                 base_experts: str | None = None):
    """Write the adapter (float32) and its config to `folder`, in PEFT's layout.

    base_model (a hub id or folder) and, for a random base such as 'tiny', base_seed name the model the
    adapter belongs to; load_adapter checks them. base_experts: "nf4" or "mxfp4", the experts' storage
    it was trained against (`base_experts` reads it back).
    """
    if not hasattr(model, "lora_config"):
        raise ValueError("the model has no LoRA: call lora.inject(model, ...) first")
    os.makedirs(folder, exist_ok=True)
    tensors = {key: to_peft(p.detach()).to("cpu").contiguous() for key, p, to_peft, _ in _entries(model)}
    # written beside and renamed into place, so a crash never leaves half a file under the real name
    save_file(tensors, os.path.join(folder, WEIGHTS + ".tmp"), metadata={"format": "pt"})
    os.replace(os.path.join(folder, WEIGHTS + ".tmp"), os.path.join(folder, WEIGHTS))
    with open(os.path.join(folder, CONFIG + ".tmp"), "w") as f:
        json.dump(adapter_config(model, base_model, base_seed, base_experts), f, indent=2)
    os.replace(os.path.join(folder, CONFIG + ".tmp"), os.path.join(folder, CONFIG))


def base_experts(folder: str) -> str:
    """How the experts were stored when the adapter in `folder` was trained: "nf4" (also for adapters
    that do not say, such as PEFT's) or "mxfp4"."""
    return _read_config(folder).get("base_model_experts", "nf4")


def _read_config(folder: str) -> dict:
    path = os.path.join(folder, CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder} has no {CONFIG}: expected a folder written by lora.save_adapter "
                                "or PEFT's save_pretrained")
    with open(path) as f:
        c = json.load(f)
    if c.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type {c.get('peft_type')!r}; only LORA adapters can be loaded")
    unsupported = [k for k in ("use_dora", "lora_bias", "fan_in_fan_out", "modules_to_save",
                               "rank_pattern", "alpha_pattern", "layers_to_transform") if c.get(k)]
    if c.get("bias", "none") != "none":
        unsupported.append("bias")
    if unsupported:
        raise ValueError(f"{path}: {', '.join(unsupported)} set; this LoRA supports plain LoRA "
                         "(one rank and alpha for all targets, no bias, DoRA or extra trained modules)")
    return c


def _targets(c: dict) -> list[str]:
    """PEFT's target_modules and target_parameters as our target names."""
    modules = c.get("target_modules") or []
    if isinstance(modules, str):  # PEFT: one string is a regular expression over whole names
        modules = [modules]
    params = [p[: -len(".weight")] if p.endswith(".weight") else p for p in c.get("target_parameters") or []]
    return list(modules) + params


def _describe(name: str, seed: int | None) -> str:
    return f"{name!r} (seed {seed})" if seed is not None else repr(name)


def check_base(c: dict, path: str, base_model: str, base_seed: int | None = None):
    """Refuse an adapter whose config names another base than (base_model, base_seed); warn where the
    two cannot be compared. An adapter on the wrong base loads without a complaint from the shapes
    and then scores at chance, so this is the only place the mistake can be caught."""
    saved, saved_seed = c.get("base_model_name_or_path"), c.get("base_model_seed")
    if saved is None:
        warnings.warn(f"{path} does not say which base model it was trained on, so it cannot be checked "
                      f"against {_describe(base_model, base_seed)}; if its scores look like chance, it "
                      "belongs to another base", stacklevel=3)
        return
    here, there = os.path.expanduser(base_model), os.path.expanduser(saved)
    folders = base_seed is None and saved_seed is None and (os.path.exists(here), os.path.exists(there))
    same_name = os.path.samefile(here, there) if folders == (True, True) else saved == base_model
    if same_name and saved_seed == base_seed:
        return
    # A hub id and a folder may hold the same weights: only there is the difference a warning.
    comparable = same_name or not (folders and any(folders))
    message = (f"{path} was trained on the base model {_describe(saved, saved_seed)}, not on "
               f"{_describe(base_model, base_seed)}")
    if comparable:
        raise ValueError(f"{message}; on another base it scores at chance. Load it onto the model it was "
                         f"trained on" + (f" (--model {saved} --seed {saved_seed})" if saved_seed is not None
                                          else f" (--model {saved})"))
    warnings.warn(f"{message}; if the two do not hold the same weights, its scores are meaningless",
                  stacklevel=3)


def load_adapter(model: nn.Module, folder: str, base_model: str | None = None, base_seed: int | None = None):
    """Load an adapter saved by `save_adapter` or PEFT; injects LoRA as its config says if the model has none.

    Given base_model (and base_seed for a random base), an adapter saved for another base is refused.
    """
    c = _read_config(folder)
    path = os.path.join(folder, CONFIG)
    if base_model is not None:
        check_base(c, path, base_model, base_seed)
    if not any(isinstance(m, LORA_MODULES) for m in model.modules()):
        try:
            inject(model, targets=_targets(c), rank=c["r"], alpha=c["lora_alpha"],
                   dropout=c.get("lora_dropout", 0.0), use_rslora=c.get("use_rslora", False), verbose=False)
        except ValueError as e:
            raise ValueError(f"{path}: its targets do not fit this model: {e}") from e
    else:
        have = model.lora_config
        for key in ("r", "lora_alpha", "use_rslora"):                # PEFT's names are ours
            if have[key] != c.get(key, False):
                raise ValueError(f"{path}: {key}={c.get(key)!r} but the model's LoRA has {key}={have[key]!r}; "
                                 "load it into a model without LoRA, or inject with the adapter's settings")

    entries = {key: (p, from_peft, to_peft) for key, p, to_peft, from_peft in _entries(model)}
    weights = os.path.join(folder, WEIGHTS)
    with safe_open(weights, "pt", device="cpu") as f:
        keys = set(f.keys())
        missing, unexpected = sorted(set(entries) - keys), sorted(keys - set(entries))
        if missing or unexpected:
            raise ValueError(f"{weights}: adapter tensors do not match the model's LoRA targets "
                             f"({', '.join(model.lora_config['targets'])}); missing {missing[:4]}"
                             f"{' ...' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}"
                             f"{' ...' if len(unexpected) > 4 else ''}")
        with torch.no_grad():
            for key, (p, from_peft, to_peft) in entries.items():
                t = f.get_tensor(key)
                want = tuple(to_peft(p.detach()).shape)
                if tuple(t.shape) != want:
                    raise ValueError(f"{weights}: tensor {key!r} has shape {tuple(t.shape)}, the model's "
                                     f"LoRA expects {want} (rank {model.lora_config['r']}); was it saved "
                                     "for another rank or model size?")
                p.copy_(from_peft(t, p).to(p.dtype))
