"""Compare a megatron checkpoint's logits at any TP/PP with transformers' logits of a HF directory.

    torchrun --nproc_per_node 2 tools/compare_logits.py --mcore-dir MC --hf-dir HF --tp 2 --pp 1

Checks a random batch and a pack of three documents (megatron sees them packed with ``cu_seqlens``; transformers
sees each document alone). The verdict is the exit code: 0 (``-> OK``) or 1 with a ``-> FAIL`` line on stdout when
max |Δ| exceeds --tolerance. Inputs that cannot be compared (a missing directory, no weights, other vocabularies)
end in one ``compare_logits: error:`` line on stderr before any process group exists (exit 1; 2 for bad usage).
"""
import argparse
import sys

import torch

from megatron_onereason.checkpoint.mcore_io import build_model_from_checkpoint
from megatron_onereason.cli import UserError, run_cli
from megatron_onereason.help_text import DocHelpFormatter
from megatron_onereason.model.forward import forward_logits
from megatron_onereason.platform import destroy_distributed, device, initialize_distributed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=DocHelpFormatter)
    p.add_argument("--mcore-dir", required=True, help="megatron checkpoint directory")
    p.add_argument("--hf-dir", required=True, help="HF model directory to compare against")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size of the megatron model")
    p.add_argument("--pp", type=int, default=1, help="pipeline parallel size of the megatron model")
    p.add_argument("--seq-length", type=int, default=48, help="random tokens per sequence")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest max |logits difference| accepted")
    args = p.parse_args(argv)
    if args.seq_length < 4:
        p.error(f"--seq-length must be >= 4 (the pack holds three documents of at least one token), got "
                f"{args.seq_length}")
    return run_cli("compare_logits", lambda: compare(args))


def check_inputs(mcore_dir: str, hf_dir: str) -> int:
    """The vocabulary size both models share; a ``UserError`` (the same on every rank, reported once) when either
    directory is not a model or their vocabularies differ."""
    from megatron_onereason.checkpoint.hf_io import read_weight_map
    from megatron_onereason.checkpoint.mcore_io import CheckpointModelInfo
    from megatron_onereason.model.qwen3_config import Qwen3Config

    try:
        vocab = CheckpointModelInfo.load(mcore_dir).config.vocab_size
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"--mcore-dir {e}") from None
    try:
        hf_vocab = Qwen3Config.from_hf_dir(hf_dir).vocab_size
        read_weight_map(hf_dir)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"--hf-dir {e}") from None
    if hf_vocab != vocab:
        raise UserError(f"--hf-dir {hf_dir} has {hf_vocab} tokens, --mcore-dir {mcore_dir} {vocab}: not the same "
                        "model (compare a checkpoint with the HF directory it was converted from or exported to)")
    return vocab


def compare(args: argparse.Namespace) -> int:
    from megatron.core import parallel_state

    vocab = check_inputs(args.mcore_dir, args.hf_dir)
    initialize_distributed(args.tp, args.pp)
    try:
        model, _ = build_model_from_checkpoint(args.mcore_dir, args.tp, args.pp, layer_spec="local")
        g = torch.Generator().manual_seed(0)
        batch = torch.randint(0, vocab, (2, args.seq_length), generator=g).to(device())
        lengths = [args.seq_length // 4, args.seq_length // 2,
                   args.seq_length - args.seq_length // 4 - args.seq_length // 2]
        docs = [torch.randint(0, vocab, (1, n), generator=g).to(device()) for n in lengths]
        cu = torch.tensor([0, lengths[0], lengths[0] + lengths[1], args.seq_length], dtype=torch.int32)  # host-side
        mc_batch = forward_logits([model], batch, vocab_size=vocab)
        mc_packed = forward_logits([model], torch.cat(docs, dim=1), cu_seqlens=cu, vocab_size=vocab)
        ok = True
        if mc_batch is not None and parallel_state.get_tensor_model_parallel_rank() == 0:
            import transformers

            hf = transformers.AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32).to(device()).eval()
            with torch.no_grad():
                d_batch = (hf(batch).logits - mc_batch).abs().max().item()
                per_doc = torch.cat([hf(d).logits for d in docs], dim=1)
                d_packed = (per_doc - mc_packed).abs().max().item()
            ok = max(d_batch, d_packed) <= args.tolerance
            print(f"compare_logits TP={args.tp} PP={args.pp} vocab={vocab}: max|Δ| batch {d_batch:.2e}, "
                  f"packed (3 docs vs separate HF forwards) {d_packed:.2e} -> {'OK' if ok else 'FAIL'}", flush=True)
        flag = torch.tensor([0 if ok else 1], device=device())
        torch.distributed.all_reduce(flag)
        return int(flag.item() > 0)
    finally:
        destroy_distributed()


if __name__ == "__main__":
    sys.exit(main())
