"""Ready-made models: GGUF llama checkpoints as transformers models with ``LoRALinear``."""

from .gguf_llama import default_gguf_path, from_gguf

__all__ = ["default_gguf_path", "from_gguf"]
