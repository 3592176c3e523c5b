"""RL entry point: GRPO, MOPD or RFT data selection with the actor-rollout engine on Ray.

    python -m megatron_onereason.rl.run --config examples/configs/tiny/grpo.yaml [section.field=value ...]

On one machine this starts a local Ray; on a cluster set ``ray.address=auto`` after starting Ray from the launcher
(examples/grpo_multinode.sh). Re-running with the same ``save`` directory resumes from its checkpoint.
``--dry-run`` prints the resolved config, the placement (GPUs per role, nodes) and the actor's memory plan, and
validates every input, without starting Ray (megatron_onereason/rl/dry_run.py).
"""
import argparse
import logging
import os
import socket
import sys
from urllib.parse import urlsplit

import yaml

from megatron_onereason.checkpoint.hf_io import read_weight_map
from megatron_onereason.cli import UserError, run_cli
from megatron_onereason.config import ConfigError, load_config, to_dict
from megatron_onereason.extras import import_optional
from megatron_onereason.help_text import DocHelpFormatter, config_epilog
from megatron_onereason.rl.config import RLConfig
from megatron_onereason.rl.lineage import check_tokenizers
from megatron_onereason.tokenizer.itemic_tokens import ITEMIC_JSON

RAY_CONNECT_TIMEOUT_S = 10.0


def check_ray_address(address: str, timeout: float = RAY_CONNECT_TIMEOUT_S) -> None:
    """``ray.address=host:port`` (or ``ray://host:port``) must answer within ``timeout``: ``ray.init`` waits for
    ever on a port where nothing listens. ``auto`` is left to Ray (it reads the address of a cluster started here)."""
    if address == "auto":
        return
    parts = urlsplit(address if "://" in address else f"//{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host or not port:
        raise ConfigError(f"ray.address={address}: expected auto, host:port or ray://host:port")
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise UserError(f"ray.address={address}: nothing answers at {host}:{port} within {timeout:.0f}s "
                        f"({e.strerror or e}); start the cluster there (ray start --head --port {port}) or fix the "
                        "address (unset: a local cluster for this run)") from None


def check_startup(cfg: RLConfig) -> None:
    """What can be checked before Ray and the engines start, each a one-line error naming the setting."""
    if cfg.data.prompts_per_step < 1:
        raise ConfigError(f"data.prompts_per_step={cfg.data.prompts_per_step}: must be >= 1 (prompts sampled per "
                          "RL step)")
    json_path = os.path.join(cfg.rollout.model_dir, ITEMIC_JSON)
    if os.path.isdir(cfg.rollout.model_dir) and not os.path.exists(json_path):
        raise UserError(f"rollout.model_dir={cfg.rollout.model_dir}: no {ITEMIC_JSON} (the itemic vocabulary the "
                        "rewards parse items with); export the model with checkpoints_convert/mcore_to_hf.py, which "
                        "carries it, or describe its tokens with tools/import_itemic_vocab.py")
    check_tokenizers(cfg)
    for name, path in cfg.hf_model_dirs():  # the engines load them after Ray started: a traceback in a worker
        if os.path.isfile(os.path.join(path, "config.json")):
            try:
                read_weight_map(path)
            except FileNotFoundError as e:
                raise UserError(f"{name}: {e}") from None
    if cfg.ray.address:
        check_ray_address(cfg.ray.address)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=DocHelpFormatter, epilog=config_epilog(RLConfig))
    p.add_argument("--config", help="YAML file with the settings below (examples/configs/tiny/grpo.yaml)")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (YAML: file, then overrides, then defaults) and exit")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config, placement and actor memory plan; validate inputs; start nothing")
    p.add_argument("--gpus-per-node", type=int, default=8, help="--dry-run: GPUs per node, for the node count")
    p.add_argument("--device-memory-gib", type=float, default=80.0, help="--dry-run: memory per GPU (H100: 80)")
    p.add_argument("overrides", nargs="*", help="section.field=value")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(RLConfig, args.config, args.overrides)  # bad settings: one line from run_cli (exit 2)
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None, width=120), end="")
        return 0
    if args.dry_run:
        from megatron_onereason.rl.dry_run import dry_run

        return dry_run(cfg, args.gpus_per_node, args.device_memory_gib)
    import_optional("ray", "rl", "the RL engine")
    check_startup(cfg)
    from megatron_onereason.rl.engine import RLEngine

    engine = RLEngine(cfg)  # checks model directories, catalog and lineage first: one line (exit 1)
    try:
        if cfg.eval_interval and engine.eval_set and cfg.algorithm != "rft" and engine.step == 0:
            before = engine.evaluate()
            engine.logger.log(0, before)  # step 0 of the metrics: the policy before any update
            logging.getLogger("megatron_onereason.rl").info("before training: %s", before)
        engine.run()
    finally:
        engine.shutdown()
    return 0


def cli(argv=None) -> int:
    """The command line (console script ``onereason-rl``): user errors become one line on stderr."""
    return run_cli("rl.run", lambda: main(argv))


if __name__ == "__main__":
    sys.exit(cli())
