"""megatron_onereason: Qwen3 on megatron-core for reasoning generative recommendation (OneReason)."""

__version__ = "0.1.0"
