"""Putting LoRA into a model by target name, freezing the rest, and listing what trains.

A target is matched against full names in the model, as PEFT matches its target_modules: a name
matches if it is the target, ends with "." + target, or is matched whole by the target read as a
regular expression. The names considered are the linear layers' (`model.layers.3.self_attn.q_proj`),
the routers' (`model.layers.3.mlp.router`) and each expert matrix's
(`model.layers.3.mlp.experts.gate_up_proj`); a target matching an experts module
(`experts`) takes both of its matrices.
"""
from __future__ import annotations

import re

import torch
import torch.nn as nn

from model.gpt_oss import GptOss
from model.moe import Experts, Router
from model.weights.nf4 import NF4Linear

from .layers import EXPERT_MATRICES, LORA_MODULES, LoRAExperts, LoRALinear, LoRARouter

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _matches(target: str, name: str) -> bool:
    if name == target or name.endswith("." + target):
        return True
    try:
        return re.fullmatch(target, name) is not None
    except re.error:
        return False


def _candidates(model: nn.Module):
    """What LoRA can adapt: {name: kind} for linear layers and routers, {experts name: matrices}."""
    modules, experts = {}, {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, NF4Linear)):
            modules[name] = "linear"
        elif isinstance(m, Router):
            modules[name] = "router"
        elif isinstance(m, Experts):
            experts[name] = EXPERT_MATRICES
    return modules, experts


def _valid_names(modules, experts) -> str:
    short = dict.fromkeys(n.rpartition(".")[2] for n in modules)
    if experts:
        short.update(dict.fromkeys(("experts",) + EXPERT_MATRICES))
    return ", ".join(short)


def as_target_list(targets) -> list[str]:
    """A list of target names; one string may hold several, comma-separated (as --targets gives them)."""
    if isinstance(targets, str):
        return [t.strip() for t in targets.split(",") if t.strip()]
    return list(targets)


def resolve_targets(model: nn.Module, targets) -> tuple[dict[str, str], dict[str, tuple[str, ...]]]:
    """Target names -> ({module name: "linear" | "router"}, {experts name: matrices}); ValueError if one matches nothing."""
    targets = as_target_list(targets)
    if not targets:
        raise ValueError("no LoRA targets given")
    modules, experts = _candidates(model)
    chosen_modules, chosen_experts = {}, {}
    for t in targets:
        hit = False
        for name, kind in modules.items():
            if _matches(t, name):
                chosen_modules[name], hit = kind, True
        for name, matrices in experts.items():
            picked = [m for m in matrices if _matches(t, name) or _matches(t, f"{name}.{m}")]
            if picked:
                have = chosen_experts.get(name, ())
                chosen_experts[name] = tuple(m for m in EXPERT_MATRICES if m in have or m in picked)
                hit = True
        if not hit:
            raise ValueError(
                f"LoRA target {t!r} matches nothing in the model. Valid targets: {_valid_names(modules, experts)} "
                "(the last part of a module's name), or a regular expression matching whole names such as "
                "'model\\.layers\\.[0-3]\\.self_attn\\.q_proj' or 'model.layers.0.mlp.experts.down_proj'.")
    return chosen_modules, chosen_experts


def _shorten(chosen: list[str], candidates: list[str], parts: int) -> list[str]:
    """The chosen names as PEFT matches them: a suffix of `parts` components where it picks exactly those."""
    groups: dict[str, list[str]] = {}
    for n in candidates:
        groups.setdefault(".".join(n.split(".")[-parts:]), []).append(n)
    chosen_set, out = set(chosen), []
    for suffix, names in groups.items():
        picked = [n for n in names if n in chosen_set]
        out.extend([suffix] if picked == names else picked)
    return out


def mark_only_lora_as_trainable(model: nn.Module):
    """requires_grad on the adapter tensors only; every base parameter frozen."""
    for name, p in model.named_parameters():
        p.requires_grad_(_is_lora(name))


def _is_lora(name: str) -> bool:
    return ".lora_A" in name or ".lora_B" in name


def lora_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The adapter's (name, parameter) pairs in module order: the same model always gives the same list."""
    return [(n, p) for n, p in model.named_parameters() if _is_lora(n)]


def inject(model: nn.Module, targets=DEFAULT_TARGETS, rank: int = 16, alpha: float = 32.0,
           dropout: float = 0.0, use_rslora: bool = False, verbose: bool = True) -> int:
    """Wrap the targeted layers in LoRA, freeze everything else; returns the number of trainable parameters.

    Records the settings as `model.lora_config` (what adapter_config.json holds) and, with verbose,
    prints a listing ending in `trainable parameters: 7,962,624`.
    """
    if any(isinstance(m, LORA_MODULES) for m in model.modules()):
        raise ValueError("the model already has LoRA layers; inject once per model")
    if rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer, not {rank}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), not {dropout}")
    modules, experts = _candidates(model)          # before wrapping: the names PEFT sees on transformers' model
    chosen_modules, chosen_experts = resolve_targets(model, targets)
    settings = dict(rank=rank, alpha=alpha, dropout=dropout, use_rslora=use_rslora)
    for name, kind in chosen_modules.items():
        base = model.get_submodule(name)
        wrapped = LoRARouter(base, **settings) if kind == "router" else LoRALinear(base, **settings)
        model.set_submodule(name, wrapped)
    for name, matrices in chosen_experts.items():
        model.set_submodule(name, LoRAExperts(model.get_submodule(name), matrices=matrices, **settings))
    mark_only_lora_as_trainable(model)

    linears = [n for n, k in chosen_modules.items() if k == "linear"]
    params = [f"{n}.weight" for n, k in chosen_modules.items() if k == "router"]
    params += [f"{n}.{m}" for n, ms in chosen_experts.items() for m in ms]
    all_params = [f"{n}.weight" for n, k in modules.items() if k == "router"]
    all_params += [f"{n}.{m}" for n, ms in experts.items() for m in ms]
    model.lora_config = {
        "r": rank, "lora_alpha": alpha, "lora_dropout": dropout, "use_rslora": use_rslora,
        "targets": as_target_list(targets),
        # PEFT's names: linear layers as modules, router and expert matrices as parameters
        "target_modules": _shorten(linears, [n for n, k in modules.items() if k == "linear"], 1),
        "target_parameters": _shorten(params, all_params, 2),
    }
    count = sum(p.numel() for _, p in lora_parameters(model))
    if verbose:
        print(describe(model))
    return count


def describe(model: nn.Module) -> str:
    """The adapter, one line per kind of target (how many layers, how many parameters), then the total."""
    c = model.lora_config
    rows: dict[str, list[int]] = {}
    for name, p in lora_parameters(model):
        parts = name.split(".")
        i = max(j for j, s in enumerate(parts) if s in ("lora_A", "lora_B"))
        kind = parts[i - 1] if parts[i - 1] != "experts" else f"experts.{parts[i + 1]}"
        row = rows.setdefault(kind, [0, 0])
        row[0] += parts[i] == "lora_A"
        row[1] += p.numel()
    scale = "alpha/sqrt(r)" if c["use_rslora"] else "alpha/r"
    lines = [f"LoRA rank {c['r']}, alpha {c['lora_alpha']:g} (scaling {scale}), dropout {c['lora_dropout']:g}"]
    lines += [f"  {kind:<22} {n:>4} x  {count:>14,}" for kind, (n, count) in rows.items()]
    lines.append(f"trainable parameters: {sum(r[1] for r in rows.values()):,}")
    return "\n".join(lines)


def count_trainable(config, targets=DEFAULT_TARGETS, rank: int = 16) -> int:
    """Trainable parameters of LoRA on the model of `config`, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = GptOss(config)
        return inject(model, targets=targets, rank=rank, verbose=False)
