"""Shared helpers: transformers' GptOss as the reference implementation, gpt-oss's real tokenizer (tests only)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model import GptOss, GptOssConfig  # noqa: E402


def hf_config(config: GptOssConfig):
    """transformers' GptOssConfig with the same fields as ours."""
    from transformers import GptOssConfig as HFConfig
    d = config.to_dict()
    d.pop("quantization_config", None)
    rope = dict(d.pop("rope_scaling"), rope_theta=d.pop("rope_theta"))
    hf = HFConfig(**{k: v for k, v in d.items() if k not in ("model_type", "architectures")},
                  rope_parameters=rope, use_cache=False)
    hf._attn_implementation = "eager"
    return hf


def hf_twin(model: GptOss):
    """transformers' GptOssForCausalLM holding exactly our weights (float32, eager attention)."""
    from transformers import GptOssForCausalLM
    hf = GptOssForCausalLM(hf_config(model.config)).float()
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=True)
    assert not missing and not unexpected
    return hf.eval()


@pytest.fixture
def tiny_config():
    return GptOssConfig.from_name("tiny")


@pytest.fixture
def tiny_model(tiny_config):
    torch.manual_seed(0)
    model = GptOss(tiny_config, attention="eager")
    with torch.no_grad():  # larger than the init's 0.02 so routing, sinks and clamps all matter
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0.0, 0.3 if "sinks" in name or "router" in name else 0.1)
    return model


REPO = Path(__file__).resolve().parent.parent
O200K_SCRIPT = REPO.parent / "shared" / "tools" / "o200k-tokenizer.sh"


@pytest.fixture(scope="session")
def o200k_dir() -> Path:
    """A folder holding gpt-oss's tokenizer.json (o200k_harmony), built offline by
    ../shared/tools/o200k-tokenizer.sh from a hash-checked package-index wheel into the user's cache,
    where later runs find it. Skipped only when the package index cannot be reached."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gpt-oss-qlora" / "o200k-harmony"
    assert O200K_SCRIPT.is_file(), f"{O200K_SCRIPT} not found: the shared/ folder belongs beside the repository"
    run = subprocess.run(["bash", str(O200K_SCRIPT), str(cache)], capture_output=True, text=True)
    if run.returncode != 0:
        pip_errors = [line for line in run.stderr.splitlines() if line.startswith("ERROR:")]
        if pip_errors:   # pip could not download the wheel: no index, or none that has it
            pytest.skip(f"o200k tokenizer not built, the package index gave no bpe-openai wheel: {pip_errors[-1]}")
        raise RuntimeError(f"{O200K_SCRIPT} failed ({run.returncode}): {run.stderr.strip()}")
    assert (cache / "tokenizer.json").is_file(), run.stdout
    return cache
