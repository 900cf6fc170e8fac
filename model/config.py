"""The gpt-oss configuration: one dataclass whose fields carry the names of the hub's config.json."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field


def _yarn() -> dict:
    return {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
            "truncate": False, "original_max_position_embeddings": 4096}


def _alternating(n: int) -> list[str]:
    # even layers slide over the last 128 tokens, odd layers see the whole prefix
    return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]


@dataclass
class GptOssConfig:
    vocab_size: int = 201088
    hidden_size: int = 2880
    intermediate_size: int = 2880
    num_hidden_layers: int = 24
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    head_dim: int = 64
    num_local_experts: int = 32
    num_experts_per_tok: int = 4
    sliding_window: int = 128
    layer_types: list[str] = field(default_factory=list)
    rope_theta: float = 150000.0
    rope_scaling: dict = field(default_factory=_yarn)
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-5
    attention_bias: bool = True
    tie_word_embeddings: bool = False
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    initializer_range: float = 0.02
    pad_token_id: int = 199999
    eos_token_id: int = 200002
    quantization_config: dict | None = None  # {"quant_method": "mxfp4", ...} for MXFP4 checkpoints

    def __post_init__(self):
        if not self.layer_types:
            self.layer_types = _alternating(self.num_hidden_layers)
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for "
                             f"{self.num_hidden_layers} layers")
        unknown = set(self.layer_types) - {"sliding_attention", "full_attention"}
        if unknown:
            raise ValueError(f"unknown layer_types {sorted(unknown)}: expected sliding_attention "
                             "or full_attention")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"pad_token_id {self.pad_token_id} is outside the vocabulary ({self.vocab_size})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")

    @classmethod
    def from_name(cls, name: str) -> "GptOssConfig":
        """A preset: `gpt-oss-20b`, `gpt-oss-120b` or `tiny`."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
        return cls(**PRESETS[name])

    @classmethod
    def from_dict(cls, d: dict) -> "GptOssConfig":
        """Read the hub's config.json fields; fields we do not model are ignored."""
        d = dict(d)
        # transformers >= 5 writes rope_parameters (holding rope_theta) instead of rope_scaling
        rope = d.pop("rope_parameters", None)
        if rope and "rope_scaling" not in d:
            rope = dict(rope)
            if "rope_theta" in rope:
                d.setdefault("rope_theta", rope.pop("rope_theta"))
            d["rope_scaling"] = rope
        if isinstance(d.get("eos_token_id"), list):
            d["eos_token_id"] = d["eos_token_id"][0]
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names and v is not None})

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str) -> "GptOssConfig":
        """Read config.json from a local folder or a hub repository."""
        if os.path.isdir(path_or_hub_id):
            path = os.path.join(path_or_hub_id, "config.json")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path_or_hub_id} has no config.json: expected a checkpoint "
                                        "folder in the hub's transformers layout")
        else:
            from huggingface_hub import hf_hub_download
            try:
                path = hf_hub_download(path_or_hub_id, "config.json")
            except Exception as e:  # offline, unknown repo, no access: say what we needed
                raise FileNotFoundError(
                    f"could not get config.json of {path_or_hub_id!r} from the hub ({type(e).__name__}: {e}). "
                    "Pass a local folder holding config.json and *.safetensors in the hub's layout, or use "
                    "--model tiny for a small random model.") from e
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["model_type"] = "gpt_oss"
        d["architectures"] = ["GptOssForCausalLM"]
        if d["quantization_config"] is None:
            del d["quantization_config"]
        return d


PRESETS = {
    "gpt-oss-20b": dict(num_hidden_layers=24, num_local_experts=32),
    "gpt-oss-120b": dict(num_hidden_layers=36, num_local_experts=128),
    # Small widths, same architecture: sinks, alternating sliding/full attention, YaRN, top-k MoE.
    # A window of 8 keeps test sequences longer than it; vocab 1024 covers data's tiny tokenizer.
    "tiny": dict(vocab_size=1024, hidden_size=64, intermediate_size=64, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=8,
                 num_experts_per_tok=2, sliding_window=8, max_position_embeddings=4096,
                 rope_scaling=dict(_yarn(), original_max_position_embeddings=128),
                 pad_token_id=0, eos_token_id=1),
}
