"""Bad input and interrupted writes, without a training process: every case ends with one clear line naming the
field or file, and no output that looks complete but is not (issue "Nothing silently wrong", items 3, 6, 7)."""
import argparse
import glob
import importlib
import inspect
import json
import os
import pkgutil
import resource
import shutil
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

import megatron_onereason.tools
from conftest import REPO
from megatron_onereason.config import ConfigError, load_config
from megatron_onereason.data.indexed import IndexedPair, IndexedPairWriter, check_prefix
from megatron_onereason.fileio import atomic_directory, remove_leftovers, temp_sibling
from megatron_onereason.training.config import TrainConfig, config_fingerprint, resume_differences


def dead_pid():
    """The pid of a process that has exited (what a killed writer leaves in its temporary names)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def leftover(path, kind="tmp"):
    """The name a killed writer on this host would have left next to ``path``."""
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{kind}-{socket.gethostname()}-{dead_pid()}")


def write_source(prefix, docs=20, masked=False, seed=0):
    rng = np.random.default_rng(seed)
    with IndexedPairWriter(prefix) as w:
        for _ in range(docs):
            n = int(rng.integers(5, 30))
            w.add(rng.integers(0, 500, n), np.zeros(n, np.uint8) if masked else (rng.random(n) < 0.8).astype(np.uint8))
    return prefix


def one_error_line(stderr, prog="train"):
    lines = [line for line in stderr.splitlines() if line.startswith(f"{prog}: ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


# ------------------------------------------------------------------------------------------- config values
@pytest.mark.parametrize("override, message", [
    ("checkpoint.save_interval=-1", "save_interval=-1 must be >= 1"),
    ("optim.clip_grad=-1", "clip_grad=-1.0 must be >= 0"),
    ("train.iters=0", "iters=0 must be >= 1"),
    ("optim.min_lr=1e-3", "min_lr=0.001 must be between 0 and lr=0.0001"),
    ("data.max_sample_length=100000", "max_sample_length=100000 is larger than seq_length=49152"),
    ("train.exit_at_iteration=11", "exit_at_iteration=11 is beyond iters=10"),
    ("parallel.tensor_model_parallel_size=0", "tensor_model_parallel_size=0 must be >= 1"),
    ("checkpoint.keep_last_n=0", "keep_last_n=0 must be >= 1"),
    ("train.nonfinite=ignore", "'ignore' is not one of ['stop', 'skip']"),
])
def test_nonsense_values_are_refused_naming_the_field(override, message, capsys):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config(TrainConfig, None, [override])
    from megatron_onereason.train import main

    assert main([override]) == 2  # the CLI: one line, config error exit code
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("train: config error:") and message in line


def test_resume_differences_and_fingerprint_are_about_what_is_trained():
    from megatron_onereason.config import to_dict

    base = load_config(TrainConfig, None, ["optim.lr=3e-3", "optim.min_lr=1e-4", "checkpoint.save=/a"])
    moved = load_config(TrainConfig, None, ["optim.lr=3e-3", "optim.min_lr=1e-4", "checkpoint.save=/b",
                                            "parallel.tensor_model_parallel_size=2", "logging.log_interval=5"])
    assert resume_differences(to_dict(base), to_dict(moved)) == []  # layout, paths, logging may change
    assert config_fingerprint(base) != config_fingerprint(moved)  # the layout is part of what the run is
    assert config_fingerprint(base) == config_fingerprint(
        load_config(TrainConfig, None, ["optim.lr=3e-3", "optim.min_lr=1e-4", "checkpoint.save=/c"]))
    changed = load_config(TrainConfig, None, ["optim.lr=1e-3", "optim.min_lr=1e-4", "train.iters=20"])
    assert resume_differences(to_dict(base), to_dict(changed)) == [("optim.lr", 3e-3, 1e-3), ("train.iters", 10, 20)]


# ------------------------------------------------------------------------------------------- paths, before any model
@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    return {"good": write_source(str(root / "good")), "masked": write_source(str(root / "masked"), masked=True),
            "root": root}


def _train_cli(capsys, *overrides):
    from megatron_onereason.train import main

    code = main(["model.init_from=tiny", "data.seq_length=64", "data.max_sample_length=32", *overrides])
    assert not torch.distributed.is_initialized()  # refused before any process group or model existed
    return code, one_error_line(capsys.readouterr().err)


def test_wrong_blend_prefix_is_refused_before_building_the_model(sources, capsys):
    good = sources["good"]
    code, line = _train_cli(capsys, f"data.blend=[1.0, {good}_tokens.bin]")
    assert code == 1 and "data.blend[1]=" in line and f"give the prefix without '_tokens.bin': {good}" in line
    code, line = _train_cli(capsys, f"data.blend=[1.0, {sources['root']}/nope/corpus]")
    assert code == 1 and "does not exist" in line
    code, line = _train_cli(capsys, f"data.blend=[1.0, {sources['root']}/corpus]")
    assert code == 1 and f"prefixes in {sources['root']}: " in line and "good" in line
    code, line = _train_cli(capsys, f"data.blend=[0.0, {good}]")
    assert code == 1 and "data.blend[0]=0.0: blend weights must be > 0" in line


def test_fully_loss_masked_data_is_refused(sources, capsys):
    code, line = _train_cli(capsys, f"data.blend=[1.0, {sources['masked']}]")
    assert code == 1 and "no source has any loss token" in line


def test_model_paths_are_checked_and_named(sources, tmp_path, capsys):
    blend = f"data.blend=[1.0, {sources['good']}]"
    broken = tmp_path / "config.json"
    broken.write_text('{"hidden_size": 64,')
    code, line = _train_cli(capsys, blend, f"model.init_from={broken}")
    assert code == 1 and f"model.init_from={broken}" in line and f"{broken}: not valid JSON" in line
    code, line = _train_cli(capsys, blend, f"model.load={tmp_path}/missing")
    assert code == 1 and "model.load=" in line and "no such directory" in line
    empty = tmp_path / "empty"
    empty.mkdir()
    code, line = _train_cli(capsys, blend, f"checkpoint.load={empty}", f"checkpoint.save={tmp_path}/other")
    assert code == 1 and "holds no checkpoint" in line and "nothing to resume" in line


def test_rl_model_dir_is_a_directory_not_a_hub_id(tmp_path):
    from megatron_onereason.config import from_dict
    from megatron_onereason.rl.config import RLConfig

    cfg = {"actor": {"model": {"load": str(tmp_path)}}, "data": {"benchmark": "b.jsonl", "catalog": str(tmp_path)},
           "rollout": {"model_dir": str(tmp_path / "sft_hf")}}
    with pytest.raises(ValueError, match=r"rollout.model_dir=.*sft_hf: not a HF model directory \(no such directory"):
        from_dict(RLConfig, cfg).check_model_dirs()  # RLEngine checks before any engine starts
    proc = subprocess.run([sys.executable, "-m", "megatron_onereason.rl.run", f"rollout.model_dir={tmp_path}/sft_hf",
                           "data.benchmark=b.jsonl", f"data.catalog={tmp_path}", f"actor.model.load={tmp_path}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "sft_hf: not a HF model directory" in one_error_line(proc.stderr, "rl.run")


def test_empty_npy_is_named(tmp_path):
    empty = tmp_path / "emb.npy"
    empty.write_bytes(b"")
    proc = subprocess.run([sys.executable, "tools/build_itemic_tokenizer.py", "--embeddings", str(empty), "--ids",
                           str(empty), "--domain", "video", "--out", str(tmp_path / "out")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert f"{empty}: an empty file (0 bytes)" in one_error_line(proc.stderr, "build_itemic_tokenizer")
    assert not os.path.exists(tmp_path / "out")


# ------------------------------------------------------------------------------------------- CLIs
CLIS = [f"megatron_onereason.tools.{m.name}" for m in pkgutil.iter_modules(megatron_onereason.tools.__path__)]
CLIS += ["megatron_onereason.train", "megatron_onereason.evaluate", "megatron_onereason.plan", "megatron_onereason.rl.run"]


class _Parsed(Exception):
    pass


@pytest.mark.parametrize("module", CLIS)
def test_every_cli_option_has_help(module, monkeypatch):
    parsers = []

    def capture(self, *args, **kwargs):
        parsers.append(self)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    main = importlib.import_module(module).main
    with pytest.raises(_Parsed):
        main([]) if inspect.signature(main).parameters else main()
    undocumented = [a.option_strings or a.dest for a in parsers[0]._actions if not a.help]
    assert undocumented == []


def test_summarize_metrics_help_and_null_values(tmp_path, capsys):
    from megatron_onereason.tools.summarize_metrics import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "NAME=PATH" in capsys.readouterr().out
    rows = tmp_path / "m.jsonl"
    rows.write_text("\n".join(json.dumps({"step": s, "loss": v, "tokens_per_sec": 10.0})
                              for s, v in ((1, 2.0), (2, None), (3, 1.0))) + "\n")
    assert main([f"run={rows}"]) == 0
    assert "| run | 1–3 | 2.000 → 1.000 |" in capsys.readouterr().out


def test_tiny_cpu_refuses_to_delete_a_directory_it_did_not_create(tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    proc = subprocess.run(["bash", "examples/tiny_cpu.sh", str(precious)], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1 and "refusing to delete it" in proc.stderr
    assert (precious / "thesis.tex").read_text() == "years of work"


# ------------------------------------------------------------------------------------------- atomic outputs
def test_overwrite_keeps_the_old_output_until_the_new_one_is_complete(tmp_path):
    out = str(tmp_path / "out")
    with atomic_directory(out) as tmp:
        open(os.path.join(tmp, "v"), "w").write("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(out, overwrite=True) as tmp:
            open(os.path.join(tmp, "v"), "w").write("new, half")
            assert open(os.path.join(out, "v")).read() == "old"  # still there while the new one is written
            raise RuntimeError("killed")
    assert open(os.path.join(out, "v")).read() == "old" and os.listdir(tmp_path) == ["out"]
    with atomic_directory(out, overwrite=True) as tmp:
        open(os.path.join(tmp, "v"), "w").write("new")
    assert open(os.path.join(out, "v")).read() == "new" and os.listdir(tmp_path) == ["out"]


def test_leftovers_of_killed_writers_are_removed_or_restored(tmp_path):
    out = str(tmp_path / "out")
    os.makedirs(out)
    stale_tmp = leftover(out)
    os.makedirs(stale_tmp)
    live_tmp = temp_sibling(out)  # this process is alive: its temp directory must survive
    os.makedirs(live_tmp)
    remove_leftovers(out)
    assert not os.path.exists(stale_tmp) and os.path.exists(live_tmp)
    shutil.rmtree(live_tmp)
    # Killed between moving the old output aside and moving the new one in: the old output comes back.
    old = leftover(out, "old")
    os.rename(out, old)
    with atomic_directory(out, overwrite=True) as tmp:
        assert open(os.path.join(tmp, "marker"), "w")
        assert os.path.isdir(out) and not os.path.exists(old)  # restored at the start
    assert os.listdir(tmp_path) == ["out"]


def test_killed_converter_leftovers_are_removed_at_the_next_start(tiny_hf_dirs, tmp_path):
    from megatron_onereason.tools import hf_to_mcore

    out = str(tmp_path / "mc")
    stale = leftover(out)
    os.makedirs(os.path.join(stale, "release"))  # a multi-GB half conversion, in real life
    assert hf_to_mcore.main(["--hf-dir", tiny_hf_dirs["tied"], "--out-dir", out, "--no-tokenizer"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["mc"]


def _commit_killed_after(prefix, renames, monkeypatch):
    """Re-write ``prefix`` and kill the commit after ``renames`` files moved into place."""
    import megatron_onereason.data.indexed as indexed

    real, done = os.replace, []

    def replace(src, dst):
        if len(done) == renames:
            raise KeyboardInterrupt("kill -9")
        done.append(dst)
        real(src, dst)

    monkeypatch.setattr(indexed.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        write_source(prefix, docs=7, seed=1)
    monkeypatch.setattr(indexed.os, "replace", real)


@pytest.mark.parametrize("renames", [1, 2, 3, 4])
def test_preprocessing_files_move_into_place_as_one_unit(tmp_path, monkeypatch, renames):
    prefix = write_source(str(tmp_path / "corpus"), docs=20)
    _commit_killed_after(prefix, renames, monkeypatch)  # new .bin files next to old .idx files, or the reverse
    with pytest.raises(ValueError, match="incomplete preprocessed data, corpus_stats.json is missing"):
        IndexedPair.open(prefix)
    assert [n for n in os.listdir(tmp_path) if ".tmp-" in n] == []  # the interrupted writer cleaned up


def test_spliced_files_from_two_runs_are_refused(tmp_path):
    a = write_source(str(tmp_path / "a"), docs=20)
    b = write_source(str(tmp_path / "b"), docs=21, seed=3)
    shutil.copy(b + "_tokens.bin", a + "_tokens.bin")  # what a rename window used to leave: new .bin, old .idx
    with pytest.raises(ValueError, match="a_tokens.bin has .* bytes but a_stats.json recorded .* different runs"):
        check_prefix(a)


def test_temp_files_of_a_killed_preprocessing_are_removed_at_the_next_start(tmp_path):
    prefix = str(tmp_path / "corpus")
    stale = [leftover(prefix + suffix) for suffix in ("_tokens.bin", "_lossmask.idx", "_stats.json")]
    for path in stale:
        open(path, "w").write("half")
    write_source(prefix)
    assert not any(os.path.exists(p) for p in stale)
    assert sorted(os.listdir(tmp_path)) == [f"corpus{s}" for s in ("_lossmask.bin", "_lossmask.idx", "_stats.json",
                                                                  "_tokens.bin", "_tokens.idx")]


def test_disk_full_during_preprocessing_leaves_nothing(tmp_path, tokenizers_3x32):
    data = tmp_path / "in.jsonl"
    rng = np.random.default_rng(0)
    data.write_text("".join(json.dumps({"segments": [{"text": "words " * int(rng.integers(50, 200)), "loss": True}]})
                            + "\n" for _ in range(400)))
    out = tmp_path / "out"
    out.mkdir()

    def small_disk():  # every file this process writes stops growing at 64 KiB (EFBIG, like ENOSPC)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    proc = subprocess.run([sys.executable, "tools/preprocess_data.py", "--input", str(data), "--tokenizer",
                           tokenizers_3x32["extended"], "--output-prefix", str(out / "p")], cwd=REPO,
                          capture_output=True, text=True, timeout=300, preexec_fn=small_disk)
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("preprocess_data: error:")]
    assert len(line) == 1 and "disk full" in line[0] and "nothing was left" in line[0], proc.stderr[-3000:]
    assert os.listdir(out) == []


# ------------------------------------------------------------------------------------------- checkpoints, converters
def test_damaged_converted_checkpoint_is_refused_on_export(tiny_mcore, tmp_path, capsys):
    from megatron_onereason.tools import mcore_to_hf

    damaged = str(tmp_path / "damaged")
    shutil.copytree(tiny_mcore, damaged)
    shard = sorted(glob.glob(os.path.join(damaged, "release", "*.distcp")))[0]
    with open(shard, "r+b") as f:  # 64 flipped bytes in the middle of one shard
        f.seek(os.path.getsize(shard) // 2)
        block = f.read(64)
        f.seek(-64, 1)
        f.write(bytes(b ^ 0xFF for b in block))
    out = str(tmp_path / "hf")
    assert mcore_to_hf.main(["--mcore-dir", damaged, "--out-dir", out]) == 1
    line = one_error_line(capsys.readouterr().err, "mcore_to_hf")
    assert f"{os.path.basename(shard)}: checksum mismatch" in line and not os.path.exists(out)
    assert mcore_to_hf.main(["--mcore-dir", tiny_mcore, "--out-dir", out]) == 0  # the intact original exports


def test_nonfinite_weights_are_neither_converted_nor_verified(tiny_hf_dirs, tiny_mcore, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from megatron_onereason.checkpoint.convert import verify_logits

    from megatron_onereason.tools import hf_to_mcore

    nan_dir = str(tmp_path / "nan_hf")
    shutil.copytree(tiny_hf_dirs["tied"], nan_dir)
    weights = os.path.join(nan_dir, "model.safetensors")
    tensors = load_file(weights)
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(tensors, weights, metadata={"format": "pt"})
    assert hf_to_mcore.main(["--hf-dir", nan_dir, "--out-dir", str(tmp_path / "mc"), "--no-tokenizer"]) == 1
    line = one_error_line(capsys.readouterr().err, "hf_to_mcore")
    assert "model.layers.1.mlp.up_proj.weight has 1 non-finite (NaN/inf) values" in line
    # --verify never passes NaN logits as "within tolerance" (nan > 1e-4 is False)
    with pytest.raises(AssertionError, match="non-finite"):
        verify_logits(nan_dir, tiny_mcore)


def test_a_checkpoint_save_that_cannot_fit_is_refused_before_writing(tmp_path, monkeypatch):
    from collections import namedtuple

    from megatron_onereason.checkpoint.integrity import write_manifest
    from megatron_onereason.cli import UserError
    from megatron_onereason.training import checkpointing

    committed = tmp_path / "iter_0000003"
    committed.mkdir()
    (committed / "__0_0.distcp").write_bytes(b"\0" * (1 << 20))
    write_manifest(str(committed))
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpointing.shutil, "disk_usage", lambda path: usage(0, 0, 1 << 19))
    with pytest.raises(UserError, match=r"512.00 KiB free, but checkpoint iteration 3 took 1.00 MiB: free space \(or "
                                        r"set checkpoint.keep_last_n\) before saving iteration 4; the committed "
                                        r"checkpoint is intact"):
        checkpointing._check_free_space(str(tmp_path), 3, 4)
    monkeypatch.setattr(checkpointing.shutil, "disk_usage", lambda path: usage(0, 0, 2 << 20))
    checkpointing._check_free_space(str(tmp_path), 3, 4)  # fits
    assert os.listdir(tmp_path) == ["iter_0000003"]
