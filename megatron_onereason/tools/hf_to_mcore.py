"""Convert a HF Qwen3 directory to a megatron-core torch_dist checkpoint.

    python checkpoints_convert/hf_to_mcore.py --hf-dir HF --out-dir MC --tp 2 --pp 1 [--verify]
"""
import argparse
import logging
import sys

from megatron_onereason.checkpoint.convert import convert_hf_to_mcore, run_converter_cli, verify_logits
from megatron_onereason.help_text import DocHelpFormatter


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=DocHelpFormatter)
    p.add_argument("--hf-dir", required=True, help="HF model directory (config.json + safetensors)")
    p.add_argument("--out-dir", required=True, help="megatron checkpoint directory to create")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size the vocab padding is made for")
    p.add_argument("--pp", type=int, default=1, help="pipeline parallel size to validate against the layers")
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="vocab rows are padded to a multiple of this times --tp (Megatron-LM's default 128)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out-dir")
    p.add_argument("--no-tokenizer", action="store_true",
                   help="convert a model directory without tokenizer files (the checkpoint and its export get none)")
    p.add_argument("--verify", action="store_true", help="compare HF and megatron logits (fp32, max |Δ| <= 1e-4)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    def convert():
        convert_hf_to_mcore(args.hf_dir, args.out_dir, args.tp, args.pp, args.overwrite,
                            args.make_vocab_size_divisible_by, require_tokenizer=not args.no_tokenizer)
        if args.verify:
            verify_logits(args.hf_dir, args.out_dir)

    return run_converter_cli("hf_to_mcore", args.out_dir, convert)


if __name__ == "__main__":  # guard needed: dist_checkpointing's async writer re-imports __main__
    sys.exit(main())
