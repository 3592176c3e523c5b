"""megatron_onereason: Qwen3 on megatron-core for reasoning generative recommendation (OneReason)."""

from megatron_onereason.cli import quiet_library_warnings

__version__ = "0.1.0"

quiet_library_warnings()  # before anything imports megatron-core: its no-TE/apex notices come at import time
