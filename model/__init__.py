"""gpt-oss in plain PyTorch: `GptOss`, its `GptOssConfig`, and `load_model` for hub checkpoints."""
from .config import GptOssConfig
from .gpt_oss import GptOss
from .weights.loading import load_model

__all__ = ["GptOss", "GptOssConfig", "load_model"]
