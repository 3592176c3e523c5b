"""Random Hugging Face Qwen3 models built locally (no downloads): the oracle for tests and the demo's start."""
from __future__ import annotations

import torch

from megatron_onereason.model.qwen3_config import Qwen3Config


def make_hf_qwen3(cfg: Qwen3Config, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A ``transformers.Qwen3ForCausalLM`` with random weights.

    RMSNorm weights are randomised too (HF initialises them to 1), so a test comparing two implementations
    notices a norm that was mapped to the wrong place.
    """
    import transformers

    hf_cfg = transformers.Qwen3Config(**{k: v for k, v in cfg.to_hf_dict().items() if k != "architectures"})
    torch.manual_seed(seed)
    model = transformers.Qwen3ForCausalLM(hf_cfg).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return model.eval()
