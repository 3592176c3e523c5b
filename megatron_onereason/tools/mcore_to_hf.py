"""Export a megatron-core torch_dist checkpoint of Qwen3 to a HF directory (sharded safetensors + tokenizer).

    python checkpoints_convert/mcore_to_hf.py --mcore-dir MC --out-dir HF2 [--iteration N] [--verify]
"""
import argparse
import logging
import sys

from megatron_onereason.checkpoint.convert import convert_mcore_to_hf, run_converter_cli, verify_logits
from megatron_onereason.checkpoint.hf_io import DEFAULT_MAX_SHARD_BYTES


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mcore-dir", required=True, help="megatron checkpoint directory (with onereason_model.json)")
    p.add_argument("--out-dir", required=True, help="HF model directory to create")
    p.add_argument("--iteration", type=int, help="export iter_N of a training checkpoint directory instead of the "
                                                 "iteration its latest_checkpointed_iteration.txt names")
    p.add_argument("--max-shard-bytes", type=int, default=DEFAULT_MAX_SHARD_BYTES,
                   help="largest safetensors shard (default: 5 GB, like save_pretrained)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out-dir")
    p.add_argument("--verify", action="store_true", help="compare HF and megatron logits (fp32, max |Δ| <= 1e-4)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    def convert():
        convert_mcore_to_hf(args.mcore_dir, args.out_dir, args.overwrite, args.max_shard_bytes, args.iteration)
        if args.verify:
            verify_logits(args.out_dir, args.mcore_dir, iteration=args.iteration)

    return run_converter_cli("mcore_to_hf", args.out_dir, convert)


if __name__ == "__main__":  # guard needed: dist_checkpointing's async writer re-imports __main__
    sys.exit(main())
