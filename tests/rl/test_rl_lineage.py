"""RL checkpoint lineage (rl/lineage.py): the catalog fingerprint, and the actor tracker as the one commit point."""
import os

import numpy as np
import pytest

from megatron_onereason.checkpoint.mcore_io import TRACKER_FILE
from megatron_onereason.rl.lineage import (
    EngineState,
    catalog_fingerprint,
    check_catalog,
    read_engine_state,
    write_engine_state,
)
from megatron_onereason.tokenizer.item_catalog import ItemCatalog


def catalog(codes, ids=("a", "b", "c")) -> ItemCatalog:
    return ItemCatalog(list(ids), ["video"] * len(ids), np.array(codes, dtype=np.int64), codebook_size=4)


def test_fingerprint_sees_the_code_assignment_not_only_the_shape():
    base = catalog([[0, 1], [1, 2], [2, 3]])
    assert catalog_fingerprint(catalog([[0, 1], [1, 2], [2, 3]])) == catalog_fingerprint(base)
    swapped = catalog([[1, 2], [0, 1], [2, 3]])  # same shape, same code tuples, two items' codes exchanged
    assert catalog_fingerprint(swapped) != catalog_fingerprint(base)
    state = EngineState(3, catalog_fingerprint(base), "/runs/cat")
    check_catalog(state, base, "/runs/cat", "/runs/save")
    with pytest.raises(ValueError, match=r"^data.catalog=/other: fingerprint .* differs from /runs/save's .*"
                                         r"trained with /runs/cat.*use a new save directory$"):
        check_catalog(state, swapped, "/other", "/runs/save")


def actor_save(root, iteration: int) -> None:
    """What the actor checkpoint does: the iteration directory, then the tracker (its commit point)."""
    os.makedirs(os.path.join(root, f"iter_{iteration:07d}"))
    with open(os.path.join(root, TRACKER_FILE), "w") as f:
        f.write(str(iteration))


def test_a_save_killed_before_the_actor_commits_resumes_the_previous_step(tmp_path):
    root = str(tmp_path)
    write_engine_state(root, 4, EngineState(2, "f", "cat"))
    actor_save(root, 4)
    assert read_engine_state(root).step == 2
    write_engine_state(root, 8, EngineState(4, "f", "cat"))  # the next save is killed here, before the actor's
    assert read_engine_state(root).step == 2  # weights of iteration 4 with the step they were saved at
    actor_save(root, 8)
    assert read_engine_state(root).step == 4
    assert not [f for f in os.listdir(os.path.join(root, "rl_engine_state")) if f.endswith(".tmp")]


def test_an_actor_checkpoint_without_engine_state_is_refused(tmp_path):
    actor_save(str(tmp_path), 6)
    with pytest.raises(ValueError, match="iter_0000006.json: missing: .* without its RL engine state"):
        read_engine_state(str(tmp_path))
