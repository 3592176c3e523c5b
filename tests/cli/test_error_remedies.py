"""Start-up errors say how to fix them, once per job, with the same exit code on every rank (issue: errors with
their remedy). The real CLIs: the trainer alone and under the project's torchrun wrapper, the planner."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from train_runs import error_lines, run_trainer, tiny_blend_args
from megatron_onereason.checkpoint.mcore_io import CheckpointModelInfo
from megatron_onereason.tokenizer.itemic_tokens import ItemicVocab
from megatron_onereason.tools import hf_to_mcore


@pytest.fixture(scope="module")
def odd_vocab(tokenizers_3x32, tmp_path_factory):
    """A checkpoint whose padded vocabulary is odd (padded to a multiple of an odd number): TP=2 cannot split it,
    although TP=2 divides the tiny model's heads, query groups and FFN."""
    hf = tokenizers_3x32["extended"]
    with open(os.path.join(hf, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    root = tmp_path_factory.mktemp("remedies")
    ckpt = str(root / "mc")
    assert hf_to_mcore.main(["--hf-dir", hf, "--out-dir", ckpt, "--make-vocab-size-divisible-by",
                             str(vocab | 1)]) == 0
    padded = CheckpointModelInfo.load(ckpt).padded_vocab_size
    assert padded % 2 == 1
    overrides = [f"model.load={ckpt}", "train.iters=1", *tiny_blend_args(str(root), ItemicVocab.load(hf), 1)]
    return {"ckpt": ckpt, "padded": padded, "overrides": overrides}


def test_plan_refuses_a_tp_the_padded_vocabulary_cannot_be_split_by(odd_vocab, capsys):
    from megatron_onereason.plan import main

    assert main(["--model", odd_vocab["ckpt"], "parallel.tensor_model_parallel_size=2", "train.global_batch_size=4",
                 "data.seq_length=96", "data.max_sample_length=48"]) == 2
    out = capsys.readouterr()
    assert "fits" not in out.out.lower()
    assert f"padded vocabulary ({odd_vocab['padded']} rows) is not divisible by TP=2: re-convert the HF checkpoint " \
           "with --tp 2" in out.err
    # the same checkpoint at TP=1 plans
    assert main(["--model", odd_vocab["ckpt"], "train.global_batch_size=4", "data.seq_length=96",
                 "data.max_sample_length=48", "--device-memory-gib", "8"]) == 0
    assert "fits" in capsys.readouterr().out


def test_plan_refuses_heads_and_layers_that_do_not_divide(odd_vocab, capsys):
    from megatron_onereason.plan import main

    base = ["--model", odd_vocab["ckpt"], "train.global_batch_size=4", "data.seq_length=96",
            "data.max_sample_length=48"]
    assert main([*base, "parallel.tensor_model_parallel_size=3"]) == 2
    assert "TP=3 does not divide num_attention_heads=4: use a TP among 1, 2" in capsys.readouterr().err
    assert main([*base, "parallel.pipeline_model_parallel_size=3"]) == 2
    assert "PP=3 does not divide num_layers=4" in capsys.readouterr().err


@pytest.mark.multiprocess
def test_trainer_without_torchrun_says_how_to_launch(odd_vocab):
    proc = run_trainer(1, [*odd_vocab["overrides"], "parallel.tensor_model_parallel_size=2"])
    assert proc.code == 1
    assert error_lines(proc) == ["train: error: world size 1 is not divisible by TP×PP×CP = 2×1×1: launch one "
                                 "process per rank: torchrun --nproc_per_node 2 (or a multiple: data parallel) "
                                 "-m megatron_onereason.train ..."]


@pytest.mark.multiprocess
def test_wrong_tp_for_the_checkpoint_is_one_line_under_the_launcher(odd_vocab):
    """Both ranks refuse the layout; rank 0 alone prints it; the launcher exits with the ranks' code and without
    torchrun's ChildFailedError report."""
    cmd = [sys.executable, "-m", "megatron_onereason.launch", "--standalone", "--nproc_per_node=2",
           "-m", "megatron_onereason.train", *odd_vocab["overrides"], "parallel.tensor_model_parallel_size=2"]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1, proc.stderr[-4000:]
    lines = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(lines) == 1, proc.stderr[-4000:]
    assert lines[0].startswith(f"train: error: the checkpoint's padded vocabulary ({odd_vocab['padded']} rows) is "
                               "not divisible by TP=2: re-convert the HF checkpoint with --tp 2 "
                               "(checkpoints_convert/hf_to_mcore.py --hf-dir HF --out-dir OUT --tp 2), or use a TP "
                               f"that divides {odd_vocab['padded']} (1"), lines
    assert "ChildFailedError" not in proc.stderr and "Root Cause" not in proc.stderr and "Traceback" not in proc.stderr
