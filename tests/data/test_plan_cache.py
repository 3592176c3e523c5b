"""Pack plans built once and memory-mapped, and the prefetching loader: same packs, same order as planning in memory."""
import json
import os

import numpy as np
import pytest
import torch

from megatron_onereason.data import packed_dataset
from megatron_onereason.data.blending import BlendComponent, BlendConfig
from megatron_onereason.data.indexed import IndexedPairWriter
from megatron_onereason.data.loader import PackSampler, TrainingPacks
from megatron_onereason.data.packed_dataset import (
    build_packed_dataset,
    cached_plans,
    load_plans,
    open_sources,
    plan_key,
)
from megatron_onereason.data.packing import PackingConfig

PACKING = PackingConfig(seq_length=128, max_sample_length=48, window=40, seed=3)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpora")
    rng = np.random.default_rng(1)
    components = []
    for name, n, weight in (("text", 90, 0.4), ("items", 150, 0.6)):
        with IndexedPairWriter(str(root / name)) as w:
            for _ in range(n):
                length = int(rng.integers(1, 70))
                w.add(rng.integers(0, 5000, length), rng.integers(0, 2, length))
        components.append(BlendComponent(name, str(root / name), weight))
    return root, BlendConfig(tuple(components), total_tokens=6000, seed=7)


def items_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


def test_saved_plan_is_the_in_memory_plan_memory_mapped(corpora, tmp_path):
    _, blend = corpora
    cache = str(tmp_path / "plans")
    directory, built = cached_plans(open_sources(blend), blend, PACKING, cache)
    assert built and os.listdir(cache) == [os.path.basename(directory)]  # no temporary left beside it
    assert cached_plans(open_sources(blend), blend, PACKING, cache) == (directory, False)  # found, not re-planned
    in_memory = build_packed_dataset(blend, PACKING, pad_id=0)
    mapped = build_packed_dataset(blend, PACKING, pad_id=0, plan_dir=directory)
    for name in ("chunk_doc", "chunk_start", "chunk_length", "pack_offsets"):
        array = getattr(mapped.plan, name)
        assert isinstance(array, np.memmap) and (array.dtype.itemsize <= 4 or name == "pack_offsets"), name
        assert np.array_equal(array, getattr(in_memory.plan, name)), name
    for name in ("source_of", "doc_of", "lengths"):
        assert np.array_equal(getattr(mapped.blend, name), getattr(in_memory.blend, name)), name
    assert mapped.stats() == in_memory.stats()
    assert len(mapped) == len(in_memory) > 5
    assert all(items_equal(mapped[i], in_memory[i]) for i in range(len(mapped)))


def test_key_follows_every_input(corpora):
    _, blend = corpora
    sources = open_sources(blend)  # the lengths are views into their memory maps: keep them open
    lengths = [np.asarray(s.lengths) for s in sources]
    key = plan_key(lengths, blend, PACKING)
    assert plan_key([lengths[0].copy(), lengths[1].copy()], blend, PACKING) == key
    changed_length = [lengths[0].copy(), lengths[1].copy()]
    changed_length[1][17] += 1
    others = [plan_key(changed_length, blend, PACKING),
              plan_key(lengths[::-1], blend, PACKING),
              plan_key(lengths, BlendConfig(blend.components, 6001, blend.seed), PACKING),
              plan_key(lengths, BlendConfig(blend.components, blend.total_tokens, 8), PACKING),
              plan_key(lengths, blend, PackingConfig(seq_length=128, max_sample_length=48, window=40, seed=4)),
              plan_key(lengths, blend, PackingConfig(seq_length=128, max_sample_length=64, window=40, seed=3))]
    assert len({key, *others}) == 1 + len(others)


def test_an_interrupted_save_leaves_nothing_that_looks_valid(corpora, tmp_path, monkeypatch):
    _, blend = corpora
    cache = tmp_path / "plans"
    real_save = np.save
    calls = []

    def failing_save(path, array):
        calls.append(path)
        if len(calls) == 4:
            raise OSError(28, "No space left on device")
        real_save(path, array)

    monkeypatch.setattr(packed_dataset.np, "save", failing_save)
    with pytest.raises(OSError, match="plan_cache"):
        cached_plans(open_sources(blend), blend, PACKING, str(cache))
    assert os.listdir(cache) == []
    monkeypatch.setattr(packed_dataset.np, "save", real_save)
    directory, built = cached_plans(open_sources(blend), blend, PACKING, str(cache))
    assert built and load_plans(directory)[1].stats.packs > 0


def test_a_plan_for_other_inputs_is_refused(corpora, tmp_path):
    _, blend = corpora
    directory, _ = cached_plans(open_sources(blend), blend, PACKING, str(tmp_path))
    with pytest.raises(ValueError, match="key"):
        load_plans(directory, key="0" * 20)
    other = PackingConfig(seq_length=256, max_sample_length=48, window=40, seed=3)
    with pytest.raises(ValueError, match="seq_length 128"):
        build_packed_dataset(blend, other, pad_id=0, plan_dir=directory)


def test_sampler_order_is_the_global_batch_split_over_ranks():
    """Oracle: global batch i is packs consumed + i*B ... + B - 1 (mod n), rank r gets the r-th contiguous share."""
    n, batch, dp, consumed = 11, 6, 3, 4
    taken = {}
    for rank in range(dp):
        it = iter(PackSampler(n, batch, rank, dp, consumed))
        taken[rank] = [next(it) for _ in range(4 * batch // dp)]
    for i in range(4):
        global_batch = [(consumed + i * batch + j) % n for j in range(batch)]
        assert sum((taken[r][i * 2:(i + 1) * 2] for r in range(dp)), []) == global_batch
    with pytest.raises(ValueError, match="DP=4"):
        PackSampler(n, batch, 0, 4, 0)


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_prefetches_the_same_packs_as_direct_reads(corpora, workers):
    _, blend = corpora
    dataset = build_packed_dataset(blend, PACKING, pad_id=0)
    packs = TrainingPacks(dataset, global_batch_size=4, dp_rank=1, dp_size=2, consumed_samples=6,
                          num_workers=workers)
    for iteration in range(len(dataset)):  # wraps around the dataset
        got = packs.next_global_batch()
        first = 6 + iteration * 4 + 2
        assert len(got) == 2
        for j, item in enumerate(got):
            assert items_equal(item, dataset[(first + j) % len(dataset)])


def test_plan_tool_builds_once(corpora, tmp_path, capsys):
    from megatron_onereason.tools.plan_packs import main

    root, _ = corpora
    args = [f"data.blend=[0.4, {root / 'text'}, 0.6, {root / 'items'}]", "data.seq_length=128",
            "data.max_sample_length=48", f"data.plan_cache={tmp_path}"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert main(args) == 0
    second = json.loads(capsys.readouterr().out)
    assert first["built"] and not second["built"] and first["plan"] == second["plan"]
    assert first["packing"]["packs"] == load_plans(first["plan"])[1].stats.packs
    assert main(["data.blend=[1.0, /nonexistent/x]"]) == 1  # a missing input: a user error
    assert "preprocess_data.py" in capsys.readouterr().err
