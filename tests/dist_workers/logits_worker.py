"""torchrun worker: load a converted checkpoint at several TP/PP layouts and save the last stage's logits.

    torchrun --nproc_per_node N tests/dist_workers/logits_worker.py CASES.json

Each case: {"ckpt", "tp", "pp", "tokens" (torch.save'd LongTensor [B, S]), "cu_seqlens" (path or null), "out"},
and optionally "labels" (path): then the output is megatron's per-token loss instead of logits.
"""
import json
import sys

import torch

from megatron_onereason.checkpoint.mcore_io import build_model_from_checkpoint
from megatron_onereason.model.forward import forward_logits
from megatron_onereason.platform import initialize_distributed


def run_case(case):
    from megatron.core import parallel_state

    initialize_distributed(tensor_model_parallel_size=case["tp"], pipeline_model_parallel_size=case["pp"])
    model, info = build_model_from_checkpoint(case["ckpt"], case["tp"], case["pp"], layer_spec="local")
    tokens = torch.load(case["tokens"])
    cu = torch.load(case["cu_seqlens"]) if case.get("cu_seqlens") else None
    labels = torch.load(case["labels"]) if case.get("labels") else None
    logits = forward_logits([model], tokens, cu_seqlens=cu, vocab_size=info.config.vocab_size, labels=labels)
    if (logits is not None and parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_data_parallel_rank() == 0):
        torch.save(logits, case["out"])
    parallel_state.destroy_model_parallel()


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        for case in json.load(f):
            run_case(case)
    torch.distributed.destroy_process_group()
