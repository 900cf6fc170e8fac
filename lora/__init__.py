"""LoRA for gpt-oss: inject by target name, list what trains, save/load in PEFT's layout, merge and export.

    from lora import inject, save_adapter, load_adapter, export_merged, lora_parameters
    inject(model, targets=("q_proj", "k_proj", "v_proj", "o_proj"), rank=16, alpha=32)
"""
from .adapter import base_experts, load_adapter, save_adapter
from .export import export_merged
from .inject import (DEFAULT_TARGETS, count_trainable, describe, inject, lora_parameters,
                     mark_only_lora_as_trainable)
from .layers import LoRAExperts, LoRALinear, LoRARouter

__all__ = ["inject", "save_adapter", "load_adapter", "base_experts", "export_merged", "lora_parameters", "count_trainable",
           "describe", "mark_only_lora_as_trainable", "DEFAULT_TARGETS", "LoRALinear", "LoRAExperts",
           "LoRARouter"]
