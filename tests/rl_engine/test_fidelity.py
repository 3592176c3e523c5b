"""RL fidelity to OneReason §6 on the engine: the default config's clipping acts on both stages, the actor scores
item tokens under the rollout's own (constrained) distribution, every ablation config runs."""
import glob
import os
import subprocess
import sys

import pytest

from conftest import REPO
from megatron_onereason.config import load_config
from megatron_onereason.data.synthetic_catalog import SyntheticCatalog
from megatron_onereason.eval.benchmark import SyntheticBenchmarkConfig, make_synthetic_benchmark, write_benchmark
from megatron_onereason.rl.config import RLConfig
from megatron_onereason.tokenizer.item_catalog import ItemCatalog

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(1500)]
ABLATIONS = os.path.join(REPO, "examples", "configs", "ablations")


@pytest.fixture(scope="module")
def task(tmp_path_factory, tiny_recommender):
    """The tiny recommender (random weights) as a megatron TP=2 checkpoint, and synthetic users."""
    root = tmp_path_factory.mktemp("fidelity")
    rec = tiny_recommender
    catalog = ItemCatalog.load(rec.catalog_dir)
    users = make_synthetic_benchmark(SyntheticCatalog.load(rec.synthetic_dir), catalog,
                                     SyntheticBenchmarkConfig(num_users=16, history_length=(4, 8), seed=0))
    write_benchmark(str(root / "bench.jsonl"), users)
    mcore = str(root / "mcore")
    subprocess.run([sys.executable, "checkpoints_convert/hf_to_mcore.py", "--hf-dir", rec.model_dir, "--out-dir",
                    mcore, "--tp", "2"], cwd=REPO, check=True, capture_output=True)
    return [f"actor.model.load={mcore}", f"rollout.model_dir={rec.model_dir}", "rollout.backend=hf", "rollout.engine_args={}",
            f"data.catalog={rec.catalog_dir}", f"data.benchmark={root / 'bench.jsonl'}", "eval_interval=null"]


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(address="local", num_cpus=6, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_default_config_clips_both_stages_within_two_steps(local_ray, task):
    """Issue 13, point 1: π_old is the actor before the rollout batch's first optimizer step, the default config
    takes two steps per batch, so once the policy moves the stage-wise clipping (eqs. 11–12) acts on reasoning and
    item tokens; the importance weights π_old/μ and the actor–rollout gaps are logged every step."""
    from megatron_onereason.rl.engine import RLEngine

    cfg = load_config(RLConfig, os.path.join(REPO, "examples", "configs", "tiny", "grpo.yaml"), [*task, "steps=2"])
    assert (cfg.rollout.sampling, cfg.grpo.old_logp, cfg.actor.mini_batches) == ("constrained", "recompute", 2)
    engine = RLEngine(cfg)
    try:
        history = engine.run()
    finally:
        engine.shutdown()
    assert len(history) == 2
    for row in history:
        assert row["train/optimizer_steps"] == 2
        assert row["invalid_item_rate"] == 0.0  # constrained decoding: every completion is a catalog item
        # The actor renormalises item tokens over the trie exactly as the rollout sampled them: μ = π_old there.
        assert row["behaviour/logp_gap_abs_mean_item"] < 1e-4, row
        assert row["train_rollout_logprob_abs_diff"] < 1e-4, row  # the policies agree (weights in sync)
        assert 0.0 < row["is_weight_min"] <= row["is_weight_mean"] <= row["is_weight_max"] <= 2.0
    mean = {k: sum(r[k] for r in history) / 2 for k in ("train/clipfrac_cot", "train/clipfrac_item")}
    assert mean["train/clipfrac_cot"] > 0 and mean["train/clipfrac_item"] > 0, mean


def test_a_diverging_actor_stops_before_the_update(local_ray, task, tmp_path):
    """Issue 16 item 1 for RL: with an absurd learning rate the loss or gradients turn NaN/inf; the actor stops
    before that update with the non-finite error instead of training (and syncing, saving) on."""
    import ray

    from megatron_onereason.rl.engine import RLEngine

    save = tmp_path / "save"
    cfg = load_config(RLConfig, os.path.join(REPO, "examples", "configs", "tiny", "grpo.yaml"),
                      [*task, "steps=4", "actor.optim.lr=1e5", "actor.optim.min_lr=1e5", "actor.optim.clip_grad=0",
                       f"save={save}", "save_interval=1"])
    engine = RLEngine(cfg)
    try:
        with pytest.raises(ray.exceptions.RayTaskError, match="non-finite \\(NaN/inf\\)"):
            engine.run()
        saved = engine.step  # the steps completed (and saved) before the diverging one
    finally:
        engine.shutdown()
    assert saved < 4


def test_every_ablation_config_runs_two_steps(local_ray, task):
    """Figs. 13–16 and unconstrained decoding: each config of examples/configs/ablations runs (one engine, started
    once; the variants run one after another) and changes what it says it changes."""
    from megatron_onereason.tools.run_ablations import run_variants, variant_configs

    names = sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(ABLATIONS, "*.yaml")))
    assert {"full", "n_by_1", "no_diversity", "uniform_clip", "no_downweight", "unconstrained"} <= set(names)
    configs = variant_configs(names, ABLATIONS, [*task, "data.prompts_per_step=4"], steps=2, seed=1)
    n_by_1 = configs["n_by_1"].rollout
    full = configs["full"].rollout
    assert n_by_1.num_traces * n_by_1.num_items == full.num_traces * full.num_items and n_by_1.num_items == 1
    rows = run_variants(configs, window=2, share_engine=True)
    assert set(rows) == set(names)
    for name, row in rows.items():
        assert all(v == v for v in row.values()), (name, row)  # no NaN: every column measured
    assert rows["full"]["invalid"] == 0.0
    assert rows["unconstrained"]["invalid"] > 0.0  # a random model writes invalid itemic tokens without the trie


def test_resume_with_another_code_assignment_is_refused(task, tmp_path):
    """Issue 16 item 5: a catalog of the right shape whose items hold other codes is refused at start (one line
    naming data.catalog), before any engine starts."""
    import numpy as np

    from megatron_onereason.checkpoint.mcore_io import TRACKER_FILE
    from megatron_onereason.rl.engine import RLEngine
    from megatron_onereason.rl.lineage import EngineState, catalog_fingerprint, write_engine_state

    cfg = load_config(RLConfig, os.path.join(REPO, "examples", "configs", "tiny", "grpo.yaml"),
                      [*task, f"save={tmp_path}"])
    catalog = ItemCatalog.load(cfg.data.catalog)
    rows = np.random.default_rng(0).permutation(len(catalog))
    swapped = ItemCatalog(catalog.item_ids, catalog.domains, catalog.codes[rows], catalog.codebook_size)
    assert swapped.codes.shape == catalog.codes.shape
    os.makedirs(tmp_path / "iter_0000002")
    (tmp_path / TRACKER_FILE).write_text("2")
    write_engine_state(str(tmp_path), 2, EngineState(1, catalog_fingerprint(swapped), "/old/catalog"))
    with pytest.raises(ValueError, match=f"^data.catalog={cfg.data.catalog}: fingerprint .* /old/catalog"):
        RLEngine(cfg)
