"""No host sync in the training step: the trainer's forward-backward over packs reads nothing back from the device
and copies nothing to it blocking, however many micro-batches (tests/dist_workers/host_sync_worker.py counts).

What the CPU count covers: every Python-level host read of a tensor that lives on the device on a GPU (the
micro-batches as the loader yields them are host data and excluded), and blocking copies to the device, in the
forward pass, megatron's recomputation of checkpointed layers and the backward. Not covered: syncs inside C++/CUDA
kernels (none in the ops this model uses on the fused path). Megatron-core's per-iteration read after the
micro-batch loop (``finalize_model_grads`` checks the global token count once per model chunk) is allowed.
Megatron's unfused ``thd`` RoPE did ``cu_seqlens.tolist()`` in every layer; packs now travel as ``sbhd`` with RoPE
at the pack's positions, so that path is not taken on any platform.
"""
import json
import os
import subprocess
import sys

from conftest import REPO

PER_ITERATION = {"megatron/core/distributed/finalize_model_grads.py:finalize_model_grads:__bool__": 1}


def test_training_step_has_no_host_sync_per_micro_batch(tmp_path):
    out = tmp_path / "syncs.json"
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tests/dist_workers/host_sync_worker.py"), str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = json.loads(out.read_text())
    assert sum(counts["control"].values()) == 2  # the counter sees a blocking copy and an .item()
    assert counts["1"] == PER_ITERATION, counts["1"]
    assert counts["3"] == PER_ITERATION, counts["3"]
