"""torchrun worker: forward + backward of packs through a converted checkpoint at one TP/PP layout, once with the
packed-attention kernels (backend ``auto``) and once with the dense-mask reference (backend ``dense``).

    torchrun --nproc_per_node N tests/dist_workers/packed_attention_worker.py CASES.json

Each case: {"ckpt", "tp", "pp", "packs" (torch.save'd list of (tokens [S], labels [S], PackLayout)), "out"}. Writes
to ``out`` (rank 0): per pack the kernels' per-token losses (from the last stage) and the largest differences
between the two runs in per-token loss and in any gradient element (over all ranks).
"""
import json
import sys

import torch

from megatron_onereason.checkpoint.mcore_io import build_model_from_checkpoint
from megatron_onereason.model.packed_attention import pack_params
from megatron_onereason.platform import initialize_distributed


def forward_backward(model, tokens, labels, layout, backend):
    """Per-token losses ``[S]`` (last stage; None elsewhere) and this rank's gradients, for a fixed weighted loss."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    weights = torch.rand(tokens.numel(), generator=torch.Generator().manual_seed(0)) / tokens.numel()
    params = pack_params(layout, "cpu", backend=backend)

    def forward_step(data_iterator, chunk):
        next(data_iterator)
        out = chunk(tokens[None], torch.arange(tokens.numel())[None], None, labels=labels[None],
                    packed_seq_params=params)
        return out, lambda per_token: ((per_token[0].float() * weights).sum(), {"per_token": per_token[0].detach()})

    model.zero_grad(set_to_none=True)
    out = get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([None]), model=model,
                                      num_microbatches=1, seq_length=tokens.numel(), micro_batch_size=1,
                                      forward_only=False)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    last = parallel_state.is_pipeline_last_stage(ignore_virtual=True)
    return (out[0]["per_token"] if last else None), grads


def run_case(case):
    from megatron.core import parallel_state

    initialize_distributed(tensor_model_parallel_size=case["tp"], pipeline_model_parallel_size=case["pp"])
    model, _ = build_model_from_checkpoint(case["ckpt"], case["tp"], case["pp"], layer_spec="local")
    results = []
    for tokens, labels, layout in torch.load(case["packs"], weights_only=False):
        loss, grads = forward_backward(model, tokens, labels, layout, "auto")
        ref_loss, ref_grads = forward_backward(model, tokens, labels, layout, "dense")
        assert grads and grads.keys() == ref_grads.keys()
        diffs = torch.tensor([0.0 if loss is None else float((loss - ref_loss).abs().max()),
                              max(float((grads[n] - ref_grads[n]).abs().max()) for n in grads),
                              max(float(g.abs().max()) for g in grads.values())])
        torch.distributed.all_reduce(diffs, op=torch.distributed.ReduceOp.MAX)
        if loss is None:
            loss = torch.zeros(tokens.numel())
        # The last stage's losses reach rank 0 (sum: other stages contribute zeros; TP ranks hold the same values).
        torch.distributed.all_reduce(loss)
        loss /= parallel_state.get_tensor_model_parallel_world_size() * parallel_state.get_data_parallel_world_size()
        results.append({"per_token_loss": loss.tolist(), "loss_diff": float(diffs[0]), "grad_diff": float(diffs[1]),
                        "grad_max": float(diffs[2])})
    if torch.distributed.get_rank() == 0:
        json.dump(results, open(case["out"], "w"))
    parallel_state.destroy_model_parallel()


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        for case in json.load(f):
            run_case(case)
    torch.distributed.destroy_process_group()
