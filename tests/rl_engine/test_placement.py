"""Placement bundles, DP shares, padding micro-batches and the scoring layout of the RL engine (no processes)."""
import pytest
import torch

from megatron_onereason.rl.actor import GRPOMicroBatch, MOPDMicroBatch, without_loss
from megatron_onereason.rl.tree_pack import TreeSequence, pack_trees
from megatron_onereason.rl.workers import (
    EngineSpec,
    describe_needs,
    dp_shards,
    hf_tree_logprobs,
    pack_logprobs_from_scores,
    plan_placement,
    role_needs,
)

ENGINES = [EngineSpec("rollout/0", 0.5), EngineSpec("rollout/1", 0.5), EngineSpec("reference", 0.25)]


def test_disaggregated_gives_every_engine_its_own_bundle_after_the_actor():
    p = plan_placement("disaggregated", 4, 1.0, ENGINES)
    assert p.actor == [0, 1, 2, 3]
    assert p.engines == {"rollout/0": 4, "rollout/1": 5, "reference": 6}
    assert p.bundles[:4] == [{"CPU": 1.0, "GPU": 1.0}] * 4
    assert p.bundles[4:] == [{"CPU": 1.0, "GPU": 0.5}, {"CPU": 1.0, "GPU": 0.5}, {"CPU": 1.0, "GPU": 0.25}]


def test_colocated_shares_the_actor_bundles_round_robin():
    fits = [EngineSpec("rollout/0", 0.25), EngineSpec("rollout/1", 0.5), EngineSpec("reference", 0.25)]
    p = plan_placement("colocated", 2, 0.5, fits)
    assert p.actor == [0, 1] and p.engines == {"rollout/0": 0, "rollout/1": 1, "reference": 0}
    assert p.bundles == [{"CPU": 3.0, "GPU": 1.0}, {"CPU": 2.0, "GPU": 1.0}]
    # 0.5 (actor) + 0.5 (rollout/0) + 0.25 (reference) > 1 GPU on bundle 0: refused with the settings to change.
    with pytest.raises(ValueError, match="bundle 0.*1.25 GPUs"):
        plan_placement("colocated", 2, 0.5, ENGINES)


def test_colocated_on_cpu_and_without_an_actor():
    p = plan_placement("colocated", 2, 0.0, [EngineSpec("rollout/0", 0.0), EngineSpec("teacher/0", 0.0),
                                             EngineSpec("teacher/1", 0.0)])
    assert p.bundles == [{"CPU": 3.0}, {"CPU": 2.0}] and p.engines == {"rollout/0": 0, "teacher/0": 1, "teacher/1": 0}
    alone = plan_placement("colocated", 0, 0.0, [EngineSpec("teacher/0", 0.0)])  # RFT: no actor to share with
    assert alone.bundles == [{"CPU": 1.0}] and alone.engines == {"teacher/0": 0}


def test_dp_shards_are_contiguous_and_pad_empty_ranks():
    shards, counts = dp_shards(list(range(5)), 2, lambda x: -1)
    assert shards == [[0, 1], [2, 3, 4]] and counts == [2, 3]
    shards, counts = dp_shards([7], 3, lambda x: -x)
    assert counts == [0, 1, 0] and shards == [[-7], [7], [-7]]
    with pytest.raises(ValueError):
        dp_shards([], 2, lambda x: x)


def test_padding_micro_batches_train_nothing():
    pack = pack_trees([TreeSequence([1, 2], [3], [[4, 5], [6, 7]])], 16)
    grpo = GRPOMicroBatch(pack, pack.trace_mask, pack.child_mask, torch.zeros(1, 1), torch.zeros(1, 2, 2),
                          torch.ones(1, 2), torch.ones(1, 2))
    pad = without_loss(grpo)
    assert pad.trace_mask.shape == grpo.trace_mask.shape and not pad.trace_mask.any() and not pad.child_mask.any()
    assert grpo.trace_mask.any()  # the original is untouched
    mopd = MOPDMicroBatch(pack, torch.ones(1, 3, dtype=torch.bool), torch.ones(1, 3), torch.zeros(1, 3))
    assert not without_loss(mopd).mask.any()


def test_given_token_scores_land_where_the_tree_pack_forward_puts_them(tiny_recommender):
    """A scoring engine's per-tree scores (``score``: one forward per materialised sequence) placed at the pack's
    positions equal the tree-pack forward with the tree mask (two independent computations)."""
    from megatron_onereason.generation.backend import make_backend

    backend = make_backend("hf", tiny_recommender.model_dir, device="cpu")
    g = torch.Generator().manual_seed(0)
    trees = [TreeSequence(torch.randint(10, 300, (n,), generator=g).tolist(),
                          torch.randint(10, 300, (t,), generator=g).tolist(),
                          [torch.randint(10, 300, (4,), generator=g).tolist() for _ in range(3)])
             for n, t in ((7, 3), (5, 0), (9, 6))]
    pack = pack_trees(trees, 96)
    placed = pack_logprobs_from_scores(pack, backend.score(trees))
    forward = hf_tree_logprobs(backend.model, pack)
    scored = torch.cat([pack.trace_index[pack.trace_mask], pack.child_index[pack.child_mask]])
    assert scored.numel() == 3 + 6 + 3 * 3 * 4
    assert torch.allclose(placed[scored], forward[scored], atol=1e-5)
    others = torch.ones(96, dtype=torch.bool)
    others[scored] = False
    assert (placed[others] == 0).all()


def test_role_needs_count_processes_and_gpus_per_role():
    needs = role_needs(16, 1.0, [EngineSpec(f"rollout/{i}", 1.0) for i in range(3)] + [EngineSpec("evaluator", 1.0)])
    assert needs == {"actor": (16, 16.0), "rollout": (3, 3.0), "evaluator": (1, 1.0)}
    assert describe_needs(needs) == ("actor 16 GPUs (16 processes), rollout 3 GPUs (3 processes), evaluator 1 GPUs "
                                     "(1 process): 20 GPUs in all")


@pytest.mark.multiprocess
def test_a_placement_the_cluster_cannot_hold_stops_with_what_is_missing():
    """Ray would wait forever for GPUs a CPU cluster does not have; the engine stops after its timeout."""
    import ray

    from megatron_onereason.rl.workers import wait_for_placement

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        p = plan_placement("disaggregated", 2, 1.0, [EngineSpec("rollout/0", 1.0)])
        pg = ray.util.placement_group(p.bundles, strategy="PACK")
        needs = role_needs(2, 1.0, [EngineSpec("rollout/0", 1.0)])
        with pytest.raises(RuntimeError, match=r"^placement: not placed after \d+ s \(ray.placement_timeout_s\): the "
                                               r"run needs actor 2 GPUs \(2 processes\), rollout 1 GPUs \(1 process\): "
                                               r"3 GPUs in all and 3 CPUs; the cluster has 0 GPUs and 2 CPUs$"):
            wait_for_placement(pg, needs, 3, timeout_s=2.0)
    finally:
        if started:
            ray.shutdown()
