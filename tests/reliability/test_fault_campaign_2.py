"""Issue "Nothing silently wrong, round 2": each case of the second fault campaign ends clean — refused in one line
naming the file / field with nothing changed, or survived — and the former hangs end under a time limit.

Refusals run in-process (the trainer checks its inputs before any process group or model exists); the two hang cases
run the real trainer in a subprocess.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

from conftest import REPO
from megatron_onereason.checkpoint.integrity import MANIFEST, check_directory
from megatron_onereason.cli import UserError
from megatron_onereason.data.indexed import IndexedPairWriter, stats_path
from megatron_onereason.tokenizer.fingerprint import FINGERPRINT_KEY, tokenizer_fingerprint


def one_line(err, prog):
    lines = [ln for ln in err.strip().splitlines() if ln.startswith(f"{prog}: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def write_jsonl(path, n=30, seed=0):
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"segments": [{"text": "words " * int(rng.integers(3, 20)), "loss": True}]}) + "\n")
    return str(path)


def write_ids(prefix, low, high, docs=40, seed=0):
    """A source of random ids in [low, high) written without a tokenizer (no fingerprint)."""
    rng = np.random.default_rng(seed)
    with IndexedPairWriter(prefix) as w:
        for _ in range(docs):
            n = int(rng.integers(6, 40))
            w.add(rng.integers(low, high, n), np.ones(n, np.uint8))
    return prefix


@pytest.fixture(scope="module")
def tokenizers(tokenizers_3x32, tmp_path_factory):
    """The 3x32 tokenizer (with its model) and another one, 3x16 codes, over the same base."""
    from megatron_onereason.tokenizer.itemic_tokens import preset
    from megatron_onereason.tokenizer.vocab_extension import extend_vocabulary

    other = str(tmp_path_factory.mktemp("tok3x16") / "ext16")
    extend_vocabulary(tokenizers_3x32["base"], other, preset("onereason_report", codebook_size=16))
    return {"x32": tokenizers_3x32["extended"], "x16": other}


@pytest.fixture(scope="module")
def data(tokenizers, tmp_path_factory):
    """The same JSONL preprocessed with each tokenizer."""
    from megatron_onereason.tools import preprocess_data

    root = tmp_path_factory.mktemp("fp_data")
    src = write_jsonl(root / "in.jsonl")
    out = {}
    for name, tok in tokenizers.items():
        out[name] = str(root / name)
        assert preprocess_data.main(["--input", src, "--tokenizer", tok, "--output-prefix", out[name]]) == 0
    out["jsonl"] = src
    return out


def _train(capsys, *overrides):
    import torch

    from megatron_onereason.train import main

    code = main(["data.seq_length=64", "data.max_sample_length=32", *overrides])
    assert not torch.distributed.is_initialized()
    return code, one_line(capsys.readouterr().err, "train")


# ------------------------------------------------------------------------------------------- fingerprints
def test_preprocessing_records_the_tokenizer_and_refuses_a_repeated_input(tokenizers, data, tmp_path, capsys):
    from megatron_onereason.tools import preprocess_data

    with open(stats_path(data["x32"])) as f:
        stats = json.load(f)
    assert stats[FINGERPRINT_KEY] == tokenizer_fingerprint(tokenizers["x32"])
    assert stats[FINGERPRINT_KEY]["itemic"]["codebook_size"] == 32
    tokens = np.fromfile(data["x32"] + "_tokens.bin", dtype=np.int32)
    assert stats["max_token_id"] == int(tokens.max())  # the oracle: the ids written
    capsys.readouterr()
    alias = tmp_path / "alias.jsonl"
    os.symlink(data["jsonl"], alias)
    code = preprocess_data.main(["--input", data["jsonl"], str(alias), "--tokenizer", tokenizers["x32"],
                                 "--output-prefix", str(tmp_path / "twice")])
    line = one_line(capsys.readouterr().err, "preprocess_data")
    assert code == 1 and f"--input names {alias} twice (also as {data['jsonl']})" in line
    code = preprocess_data.main(["--input", data["jsonl"], "--tokenizer", tokenizers["x32"],
                                 "--output-prefix", str(alias / "sub" / "p")])  # under a file
    line = one_line(capsys.readouterr().err, "preprocess_data")
    assert code == 1 and f"{alias} is a file, not a directory" in line
    assert os.listdir(tmp_path) == ["alias.jsonl"]


def test_data_of_another_tokenizer_is_refused_naming_both(tokenizers, data, capsys):
    code, line = _train(capsys, f"model.init_from={tokenizers['x32']}", f"data.blend=[1.0, {data['x16']}]")
    assert code == 1 and f"data.blend[1]={data['x16']}: made with the tokenizer ({tokenizers['x16']})" in line
    assert "itemic onereason_report 3x16" in line and "itemic onereason_report 3x32" in line
    assert f"preprocess it again with --tokenizer {tokenizers['x32']}" in line
    assert "model.allow_other_tokenizer=true" in line


def test_stage1_itemic_vocab_of_another_tokenizer_is_refused(tokenizers, data, capsys):
    code, line = _train(capsys, f"model.init_from={tokenizers['x32']}", f"data.blend=[1.0, {data['x32']}]",
                        f"model.itemic_vocab={tokenizers['x16']}", "train.trainable=[itemic_rows]")
    assert code == 1 and f"model.itemic_vocab={tokenizers['x16']}: made with the tokenizer" in line
    assert "3x16" in line and "3x32" in line and f"point model.itemic_vocab at {tokenizers['x32']}" in line


def test_ids_beyond_the_model_vocab_are_refused(data, tmp_path, capsys):
    high = write_ids(str(tmp_path / "high"), 1000, 1100)
    code, line = _train(capsys, "model.init_from=tiny", f"data.blend=[1.0, {high}]")
    assert code == 1 and f"data.blend[1]={high}: holds token ids up to 1099" in line and "has 1024 tokens" in line


def test_converter_refuses_a_vocab_smaller_than_its_tokenizer(tiny_hf_dirs, tokenizers, tmp_path, capsys):
    from megatron_onereason.tools import hf_to_mcore

    small = tmp_path / "small"
    shutil.copytree(tiny_hf_dirs["tied"], small)  # 1024 rows
    for name in os.listdir(tokenizers["x32"]):  # a tokenizer with ids up to 1124
        if "token" in name:
            shutil.copy(os.path.join(tokenizers["x32"], name), small)
    assert hf_to_mcore.main(["--hf-dir", str(small), "--out-dir", str(tmp_path / "mc")]) == 1
    line = one_line(capsys.readouterr().err, "hf_to_mcore")
    assert "vocab_size=1024, but its tokenizer has ids up to 1124" in line
    assert not os.path.exists(tmp_path / "mc")
    assert hf_to_mcore.main(["--hf-dir", tiny_hf_dirs["tied"], "--out-dir", str(tmp_path / "mc")]) == 1
    line = one_line(capsys.readouterr().err, "hf_to_mcore")
    assert f"{tiny_hf_dirs['tied']}: no tokenizer files" in line and "pass --no-tokenizer" in line
    assert not os.path.exists(tmp_path / "mc")


# ------------------------------------------------------------------------------------------- overrides
@pytest.mark.parametrize("override, message", [
    ("data.blend=[1.0, /a", "override 'data.blend=[1.0, /a': the value is not valid YAML"),
    ("optim.lrr=1e-3", "override 'optim.lrr=1e-3': no 'lrr' in optim (known: "),
    ("optim.lr=fast", "override 'optim.lr=fast': expected a number"),
    ("data.seed=-1", "data: seed=-1 must be >= 0"),
])
def test_override_errors_are_blamed_on_the_override(override, message, tmp_path, capsys):
    from megatron_onereason.train import main

    cfg = tmp_path / "run.yaml"
    cfg.write_text("optim: {lr: 3.0e-3}\n")
    assert main(["--config", str(cfg), override]) == 2
    line = one_line(capsys.readouterr().err, "train")
    assert line.startswith("train: config error:") and message in line
    if "override" in message:
        assert str(cfg) not in line  # the YAML file is fine


# ------------------------------------------------------------------------------------------- checksums
def test_a_deleted_manifest_is_damage_only_old_checkpoints_load_unverified(tiny_mcore, tmp_path, caplog):
    import torch

    from megatron_onereason.checkpoint.integrity import SAVED_WITH_CHECKSUMS

    out = str(tmp_path / "mc")
    shutil.copytree(tiny_mcore, out)
    release = os.path.join(out, "release")
    assert check_directory(release)
    os.remove(os.path.join(release, MANIFEST))
    with pytest.raises(UserError, match=f"release is damaged: {MANIFEST}: missing \\(this checkpoint was saved with "
                                        "checksums"):
        check_directory(release)
    # What an older version wrote: no marker in the common state. That alone loads unverified, and says so.
    common = os.path.join(release, "common.pt")
    state = torch.load(common, weights_only=False)
    del state[SAVED_WITH_CHECKSUMS]
    torch.save(state, common)
    assert check_directory(release) is False
    assert "saved before checksums existed): not verified" in caplog.text


# ------------------------------------------------------------------------------------------- scores
def test_scoring_never_overwrites_its_input_and_refuses_k_above_the_generations(recif_fixture_path, tmp_path,
                                                                                capsys):
    from megatron_onereason import evaluate

    dump = tmp_path / "dump.json"
    shutil.copy(recif_fixture_path, dump)
    before = dump.read_bytes()
    assert evaluate.cli(["--score-generations", str(dump), "--out", str(dump), "--k", "1,32"]) == 1
    assert "it would be replaced by its scores" in one_line(capsys.readouterr().err, "evaluate")
    assert evaluate.cli(["--score-generations", str(dump), "--out", str(tmp_path), "--k", "1,128"]) == 1
    line = one_line(capsys.readouterr().err, "evaluate")
    assert "K=128 is above the 32 generations a sample has at most" in line
    assert dump.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["dump.json"]
    assert evaluate.cli(["--score-generations", str(dump), "--out", f"{tmp_path}/", "--k", "1,32"]) == 0
    with open(tmp_path / "scores.json") as f:
        counts = json.load(f)["counts"]
    out = capsys.readouterr().out
    assert counts["unparsed_generations"] == 64  # the real fixture holds 64 generations without an item
    assert "64 of 3200 generations hold no item of scheme" in out  # on stdout, not only in the JSON
    assert dump.read_bytes() == before


# ------------------------------------------------------------------------------------------- hangs
def _job_processes(marker):
    """Live processes whose command line names ``marker`` (the test's unique data path)."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        try:
            if marker in " ".join(p.info["cmdline"] or []) and p.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def _trainer(model, prefix, iters):
    return [sys.executable, "-m", "megatron_onereason.train", f"model.load={model}", f"data.blend=[1.0, {prefix}]",
            "data.seq_length=96", "data.max_sample_length=48", "train.global_batch_size=4", f"train.iters={iters}"]


@pytest.mark.multiprocess
def test_an_error_in_the_forward_ends_the_trainer_and_its_workers(tiny_mcore, tmp_path):
    """Data without its recorded largest id (an older preprocessing) reaches the forward with ids past the
    embedding: the IndexError used to leave the trainer waiting forever for its data-loader workers."""
    prefix = write_ids(str(tmp_path / "beyond"), 1000, 1100)
    with open(stats_path(prefix)) as f:
        stats = json.load(f)
    del stats["max_token_id"]
    with open(stats_path(prefix), "w") as f:
        json.dump(stats, f)
    proc = subprocess.run(_trainer(tiny_mcore, prefix, 3), cwd=REPO, capture_output=True, text=True, timeout=150,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode != 0 and "IndexError" in proc.stderr
    assert _job_processes(prefix) == []


@pytest.mark.multiprocess
def test_data_loader_workers_die_with_a_killed_trainer(tiny_mcore, tmp_path):
    prefix = write_ids(str(tmp_path / "good"), 0, 1000)
    proc = subprocess.Popen(_trainer(tiny_mcore, prefix, 100000), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        deadline = time.time() + 120
        while len(psutil.Process(proc.pid).children()) < 2:  # the two data-loader workers
            assert proc.poll() is None and time.time() < deadline, "the trainer did not start its workers"
            time.sleep(0.5)
        workers = [c.pid for c in psutil.Process(proc.pid).children()]
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # a crash: no clean-up code runs in the trainer
        proc.wait(timeout=30)
    _, alive = psutil.wait_procs([psutil.Process(p) for p in workers if psutil.pid_exists(p)], timeout=10)
    assert alive == [], f"orphaned workers: {alive}"


# ------------------------------------------------------------------------------------------- RL start-up
def _rl(capsys, tmp_path, *overrides):
    from megatron_onereason.cli import run_cli
    from megatron_onereason.rl.run import main

    base = [f"rollout.model_dir={tmp_path}/missing_hf", "data.benchmark=b.jsonl", f"data.catalog={tmp_path}",
            f"actor.model.load={tmp_path}"]
    start = time.time()
    code = run_cli("rl.run", lambda: main([*base, *overrides]))
    return code, one_line(capsys.readouterr().err, "rl.run"), time.time() - start


def test_rl_start_up_refusals_come_before_ray(tmp_path, capsys):
    import socket

    import ray

    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, line, seconds = _rl(capsys, tmp_path, f"ray.address=127.0.0.1:{port}")
    assert code == 1 and f"ray.address=127.0.0.1:{port}: nothing answers at 127.0.0.1:{port}" in line
    assert seconds < 15
    code, line, _ = _rl(capsys, tmp_path, "data.prompts_per_step=0")
    assert code == 2 and "data.prompts_per_step=0: must be >= 1" in line
    model = tmp_path / "hf"
    model.mkdir()
    code, line, _ = _rl(capsys, tmp_path, f"rollout.model_dir={model}")
    assert code == 1 and f"rollout.model_dir={model}: no itemic_tokens.json" in line
    assert not ray.is_initialized()


def test_a_rank_that_only_lost_its_peer_does_not_report_an_error(capsys):
    from megatron_onereason.cli import run_cli

    def lost():
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer "
                           "[127.0.0.1]:29500")

    assert run_cli("train", lost) == 1
    err = capsys.readouterr().err
    assert "error:" not in err and "Connection closed" not in err and "another process of the job ended" in err
    with pytest.raises(RuntimeError, match="a bug"):  # anything else keeps its traceback
        run_cli("train", lambda: (_ for _ in ()).throw(RuntimeError("a bug")))


def test_summarize_metrics_names_an_empty_or_broken_metrics_file(tmp_path, capsys):
    from megatron_onereason.tools.summarize_metrics import main

    empty, broken = tmp_path / "empty.jsonl", tmp_path / "broken.jsonl"
    empty.write_text("")
    broken.write_text('{"step": 1, "loss": 2.0}\n{"step": 2,\n')
    assert main([f"a={empty}"]) == 1
    assert f"{empty}: no metrics rows" in one_line(capsys.readouterr().err, "summarize_metrics")
    assert main([f"b={broken}"]) == 1
    assert f"{broken}:2: not a JSON line" in one_line(capsys.readouterr().err, "summarize_metrics")
    assert main([f"c={tmp_path}/missing.jsonl"]) == 1
    assert f"{tmp_path}/missing.jsonl: No such file or directory" in one_line(capsys.readouterr().err,
                                                                            "summarize_metrics")


def test_a_missing_weight_shard_is_named(tiny_hf_dirs, tmp_path, capsys):
    from megatron_onereason.tools import hf_to_mcore

    src = tmp_path / "untied"
    shutil.copytree(tiny_hf_dirs["untied"], src)  # sharded, with an index
    shard = sorted(n for n in os.listdir(src) if n.endswith(".safetensors"))[1]
    os.remove(src / shard)
    assert hf_to_mcore.main(["--hf-dir", str(src), "--out-dir", str(tmp_path / "mc"), "--no-tokenizer"]) == 1
    line = one_line(capsys.readouterr().err, "hf_to_mcore")
    with open(src / "model.safetensors.index.json") as f:
        held = sorted(name for name, file in json.load(f)["weight_map"].items() if file == shard)
    more = f" and {len(held) - 1} more tensors" if len(held) > 1 else ""
    assert f"{src}/model.safetensors.index.json: shard {shard} is listed but missing (it holds {held[0]}{more})" in line


def test_damaged_model_json_and_a_checkpoint_path_that_is_a_file_are_named(tiny_mcore, tmp_path, capsys):
    from megatron_onereason.tools import mcore_to_hf

    damaged = tmp_path / "mc"
    shutil.copytree(tiny_mcore, damaged)
    (damaged / "onereason_model.json").write_text('{"qwen3": ')
    assert mcore_to_hf.main(["--mcore-dir", str(damaged), "--out-dir", str(tmp_path / "hf")]) == 1
    line = one_line(capsys.readouterr().err, "mcore_to_hf")
    assert f"{damaged}/onereason_model.json: damaged (" in line and not os.path.exists(tmp_path / "hf")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    code, line = _train(capsys, "model.init_from=tiny", f"checkpoint.save={a_file}", "data.blend=[1.0, /nowhere]")
    assert code == 1 and f"checkpoint.save={a_file}: is a file; it names a checkpoint directory" in line


# ------------------------------------------------------------------------------------------- RL tokenizer lineage
@pytest.fixture(scope="module")
def rl_inputs(tokenizers, tmp_path_factory):
    """An actor checkpoint of the 3x16 model (converted with its tokenizer) and catalogs of 3x16 and 2x32 codes."""
    from megatron_onereason.tokenizer.item_catalog import MANIFEST_FILE, ItemCatalog
    from megatron_onereason.tools import hf_to_mcore

    root = tmp_path_factory.mktemp("rl_lineage")
    actor = root / "actor16"
    assert hf_to_mcore.main(["--hf-dir", tokenizers["x16"], "--out-dir", str(actor)]) == 0
    catalogs = {}
    for name, levels, size in (("c3x16", 3, 16), ("c2x32", 2, 32)):
        directory = root / name
        directory.mkdir()
        codes = np.arange(6 * levels).reshape(6, levels) % size
        ItemCatalog([f"i{n}" for n in range(6)], ["video"] * 6, codes, size).save(str(directory))
        (directory / MANIFEST_FILE).write_text(json.dumps({"levels": levels, "codebook_size": size}))
        catalogs[name] = str(directory)
    return {"actor16": str(actor), **catalogs}


def _rl_lineage(capsys, tokenizers, tmp_path, *overrides):
    """rl.run (GRPO) with the 3x32 tokenizer as the rollout model; refused before Ray starts."""
    import ray

    from megatron_onereason.cli import run_cli
    from megatron_onereason.rl.run import main

    base = [f"rollout.model_dir={tokenizers['x32']}", f"data.prompts={tmp_path}/p.jsonl",
            f"data.catalog={tmp_path}/no_catalog", f"actor.model.load={tmp_path}/no_actor"]
    code = run_cli("rl.run", lambda: main([*base, *overrides]))
    assert not ray.is_initialized()
    return code, one_line(capsys.readouterr().err, "rl.run")


def test_rl_refuses_an_actor_teacher_or_catalog_of_another_tokenizer(tokenizers, rl_inputs, tmp_path, capsys):
    code, line = _rl_lineage(capsys, tokenizers, tmp_path, f"actor.model.load={rl_inputs['actor16']}")
    assert code == 1 and line.startswith(f"rl.run: error: actor.model.load={rl_inputs['actor16']}: made with the "
                                         f"tokenizer ({rl_inputs['actor16']}/hf) of")
    assert "itemic onereason_report 3x16" in line and f"rollout.model_dir={tokenizers['x32']}) has" in line
    assert "3x32" in line and f"mcore_to_hf.py --mcore-dir {rl_inputs['actor16']}" in line
    assert "actor.model.allow_other_tokenizer=true" in line
    # The override passes the tokenizer but not a vocabulary the rollout cannot serve (1077 tokens vs 1125).
    code, line = _rl_lineage(capsys, tokenizers, tmp_path, f"actor.model.load={rl_inputs['actor16']}",
                             "actor.model.allow_other_tokenizer=true")
    assert code == 1 and f"actor.model.load={rl_inputs['actor16']}: a model of 1077 tokens, but rollout" in line
    code, line = _rl_lineage(capsys, tokenizers, tmp_path, "algorithm=mopd",
                             f"mopd.teachers={{video: {tokenizers['x32']}, ad: {tokenizers['x16']}}}")
    assert code == 1 and f"mopd.teachers.ad={tokenizers['x16']}: made with the tokenizer of" in line
    assert "3x16" in line and "use a teacher trained from the student's model" in line
    code, line = _rl_lineage(capsys, tokenizers, tmp_path, "algorithm=mopd", f"mopd.teachers={{video: "
                             f"{tokenizers['x32']}}}", f"mopd.general_teacher={tokenizers['x16']}", "mopd.adv_clip=[0, 1]",
                             f"data.general_prompts={tmp_path}/g.jsonl", "rollout.backend=hf")
    from transformers import AutoTokenizer

    student, teacher = (AutoTokenizer.from_pretrained(tokenizers[n]).get_vocab() for n in ("x32", "x16"))
    moved = sum(student.get(token) != i for token, i in teacher.items())  # <b_*>, <c_*>: 2 x 16
    assert code == 1 and f"mopd.general_teacher={tokenizers['x16']}: {moved} of its tokens have other ids" in line
    code, line = _rl_lineage(capsys, tokenizers, tmp_path, f"data.catalog={rl_inputs['c3x16']}")
    assert code == 1 and f"data.catalog={rl_inputs['c3x16']}: items of 3 levels x 16 codes, but the rollout " in line
    assert "--levels 3 --codebook-size 16" in line and "actor.model.allow_other_tokenizer=true" in line
    code, line = _rl_lineage(capsys, tokenizers, tmp_path, f"data.catalog={rl_inputs['c2x32']}",
                             "actor.model.allow_other_tokenizer=true")  # 2 levels: no token writes them, no override
    assert code == 1 and "items of 2 levels x 32 codes" in line and "allow_other_tokenizer" not in line


def test_rl_tokenizer_checks_pass_the_inputs_of_one_tokenizer(tokenizers, rl_inputs, caplog):
    from megatron_onereason.config import load_config
    from megatron_onereason.rl.config import RLConfig
    from megatron_onereason.rl.lineage import check_tokenizers

    def cfg(*overrides):
        return load_config(RLConfig, None, ["data.prompts=p.jsonl", f"actor.model.load={rl_inputs['actor16']}",
                                            *overrides])

    check_tokenizers(cfg(f"rollout.model_dir={tokenizers['x16']}", f"data.catalog={rl_inputs['c3x16']}",
                         "algorithm=mopd", f"mopd.teachers={{video: {tokenizers['x16']}}}"))
    assert caplog.text == ""
    check_tokenizers(cfg(f"rollout.model_dir={tokenizers['x32']}", f"data.catalog={rl_inputs['c3x16']}",
                         "actor.model.load=none", "actor.model.allow_other_tokenizer=true"))
    assert "items of 3 levels x 16 codes" in caplog.text and "used anyway" in caplog.text


@pytest.mark.multiprocess
def test_when_one_rank_fails_first_its_error_is_the_one_line(tmp_path):
    """Two gloo ranks under the project's launcher; rank 1 alone reads a missing file while rank 0 waits in an
    all-reduce: rank 1's error is the job's one ``error:`` line; rank 0 at most says it stopped because a peer ended."""
    missing = tmp_path / "only_rank_1_reads.txt"
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "megatron_onereason.launch", "--standalone", "--nproc_per_node", "2",
                           os.path.join(REPO, "tests", "dist_workers", "one_rank_fails_worker.py"),
                           "--rank-1-reads", str(missing)], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
    assert time.time() - start < 60 and proc.returncode == 1, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
    assert errors == [f"train: error: [rank 1] {missing}: No such file or directory"], proc.stderr[-3000:]
    # Rank 0 says it stopped when it sees the peer end before the launcher's stop reaches it (19 of 20 runs by hand);
    # whatever it says is that line, never a second error.
    rank_0 = [ln for ln in proc.stderr.splitlines() if "[rank 0]" in ln]
    assert set(rank_0) <= {"train: [rank 0] stopped: another process of the job ended first (its error is the one to "
                           "read)"}, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Connection closed" not in proc.stderr


# ------------------------------------------------------------------------------------------- unclear endings
def _without_weights(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    return str(dst)


def test_a_model_directory_without_weights_is_named_before_any_work(tokenizers, tiny_mcore, tmp_path, capsys):
    from megatron_onereason import evaluate
    from megatron_onereason.tools import compare_logits, hf_to_mcore

    bare = _without_weights(tokenizers["x32"], tmp_path / "bare")
    no_weights = f"{bare}: no weights: neither model.safetensors nor model.safetensors.index.json found"
    out = tmp_path / "report"
    assert evaluate.cli(["--model", bare, "--data", "b.jsonl", "--catalog", "c", "--out", str(out)]) == 1
    assert f"evaluate: error: --model {no_weights}" in one_line(capsys.readouterr().err, "evaluate")
    code, line = _rl_lineage(capsys, tokenizers, tmp_path, f"rollout.model_dir={bare}")
    assert code == 1 and f"rl.run: error: rollout.model_dir: {no_weights}" in line
    assert hf_to_mcore.main(["--hf-dir", bare, "--out-dir", str(out)]) == 1
    assert no_weights in one_line(capsys.readouterr().err, "hf_to_mcore")
    assert compare_logits.main(["--mcore-dir", tiny_mcore, "--hf-dir", bare]) == 1
    assert f"compare_logits: error: --hf-dir {no_weights}" in one_line(capsys.readouterr().err, "compare_logits")
    assert compare_logits.main(["--mcore-dir", str(tmp_path / "nothing"), "--hf-dir", bare]) == 1
    assert f"--mcore-dir {tmp_path}/nothing/onereason_model.json: not a megatron_onereason checkpoint" in \
        one_line(capsys.readouterr().err, "compare_logits")
    assert compare_logits.main(["--mcore-dir", tiny_mcore, "--hf-dir", tokenizers["x32"]]) == 1  # 1024 vs 1125 rows
    line = one_line(capsys.readouterr().err, "compare_logits")
    assert f"--hf-dir {tokenizers['x32']} has 1125 tokens, --mcore-dir {tiny_mcore} 1024: not the same model" in line
    assert not out.exists()


def test_compare_logits_verdict_stays_the_exit_code(tiny_hf_dirs, tiny_mcore, tmp_path, capsys):
    """1 with a FAIL line (not an error line) for another model of the same shape; 0 with OK for its source."""
    import torch

    from megatron_onereason.model.hf_qwen3 import make_hf_qwen3
    from megatron_onereason.model.qwen3_config import qwen3_preset
    from megatron_onereason.tools import compare_logits

    other = str(tmp_path / "other")
    make_hf_qwen3(qwen3_preset("tiny"), seed=7).save_pretrained(other)  # the tied tiny model is seed 1
    for hf_dir, code, verdict in ((other, 1, "-> FAIL"), (tiny_hf_dirs["tied"], 0, "-> OK")):
        assert compare_logits.main(["--mcore-dir", tiny_mcore, "--hf-dir", hf_dir]) == code
        out, err = capsys.readouterr()
        assert out.strip().endswith(verdict) and "error:" not in err
        assert not torch.distributed.is_initialized()  # torn down on the way out


def test_a_corrupt_parquet_is_named_by_evaluate_and_rl(tokenizers, tiny_recommender, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from megatron_onereason import evaluate
    from megatron_onereason.cli import run_cli
    from megatron_onereason.rl.run import main as rl_main

    rng = np.random.default_rng(0)
    rows = [{"messages": json.dumps([{"role": "user", "content": "".join(rng.choice(list("abcdefgh"), 300))}]),
             "metadata": json.dumps({"answer": ""})} for _ in range(64)]
    corrupt = tmp_path / "task_test.parquet"
    pq.write_table(pa.Table.from_pylist(rows), corrupt, row_group_size=16)
    data = bytearray(corrupt.read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = bytes(64)  # a data page in the middle, the footer intact
    corrupt.write_bytes(bytes(data))
    out = tmp_path / "report"
    assert evaluate.cli(["--model", tokenizers["x32"], "--recif", str(corrupt), "--out", str(out)]) == 1
    line = one_line(capsys.readouterr().err, "evaluate")
    assert f"evaluate: error: {corrupt}: not a readable parquet file after row " in line and not out.exists()
    code = run_cli("rl.run", lambda: rl_main([
        "--dry-run", f"rollout.model_dir={tiny_recommender.model_dir}", f"data.catalog={tiny_recommender.catalog_dir}",
        f"data.prompts={corrupt}", f"actor.model.load={tmp_path}/none"]))
    line = one_line(capsys.readouterr().err, "rl.run")
    assert code == 1 and f"rl.run: error: {corrupt}: not a readable parquet file after row " in line
    assert line.endswith(")")  # pyarrow's message cut at its first line, not in the middle of ours


def test_read_only_outputs_are_named_before_any_work(tokenizers, recif_fixture_path, tmp_path):
    """Run as a user without the right to write there (root without CAP_DAC_OVERRIDE: root ignores permissions)."""
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)
    blocked = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--inh-caps",
               "-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    if blocked and not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv: permissions cannot be enforced")
    driver = """if True:
        import json, sys
        from megatron_onereason import evaluate
        from megatron_onereason.tools import hf_to_mcore, preprocess_data
        from megatron_onereason.train import main as train
        ro, fixture, hf, src = sys.argv[1:]
        print(json.dumps([
            evaluate.cli(["--score-generations", fixture, "--k", "1,32", "--out", f"{ro}/scores.json"]),
            preprocess_data.main(["--input", src, "--tokenizer", hf, "--output-prefix", f"{ro}/sub/p"]),
            hf_to_mcore.main(["--hf-dir", hf, "--out-dir", f"{ro}/mc"]),
            train(["model.init_from=tiny", f"checkpoint.save={ro}/ckpt", "data.blend=[1.0, /nowhere]"])]))
    """
    src = write_jsonl(tmp_path / "in.jsonl", n=3)
    proc = subprocess.run([*blocked, sys.executable, "-c", driver, str(read_only), recif_fixture_path,
                           tokenizers["x32"], src], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [1, 1, 1, 1], proc.stderr[-3000:]
    why = f"not writable ({read_only}: permission denied); write it elsewhere or make that directory writable"
    lines = [ln for ln in proc.stderr.splitlines() if ": error: " in ln]
    assert lines == [f"evaluate: error: {read_only}/scores.json: {why}",
                     f"preprocess_data: error: output prefix {read_only}/sub/p: {why}",
                     f"hf_to_mcore: error: {read_only}/mc: {why}",
                     f"train: error: checkpoint.save={read_only}/ckpt: {why}"], proc.stderr[-3000:]
    assert os.listdir(read_only) == []


# ------------------------------------------------------------------------------------------- own cases, round 3
def test_own_cases_end_in_one_line(tokenizers, tmp_path, capsys):
    """Cases of the third campaign that ended silent (exit 0) or unclear: each is refused naming what is wrong."""
    from megatron_onereason import evaluate
    from megatron_onereason.rl.data import detect_format
    from megatron_onereason.tools import compare_logits, make_synthetic_benchmark, preprocess_data

    catalog = tmp_path / "catalog"
    catalog.mkdir()
    (catalog / "manifest.json").write_text('{"levels": 3,')
    code, line = _rl_lineage(capsys, tokenizers, tmp_path, f"data.catalog={catalog}")
    assert code == 1 and f"{catalog}/manifest.json: damaged, not valid JSON" in line
    for override in ("rollout.num_traces=0", "rollout.num_items=0", "steps=0"):  # used to run and learn nothing
        code, line = _rl_lineage(capsys, tokenizers, tmp_path, override, "grpo.diversity=false")
        assert code == 2 and override.split(".")[-1].split("=")[0] in line and "config error" in line
    empty = tmp_path / "prompts.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match=f"{empty}: empty \\(no prompt records\\)"):
        detect_format(str(empty))
    assert preprocess_data.main(["--input", str(tmp_path), "--tokenizer", tokenizers["x32"], "--output-prefix",
                                 str(tmp_path / "p")]) == 1
    line = one_line(capsys.readouterr().err, "preprocess_data")
    assert f"{tmp_path}: a directory; --input takes files" in line
    for main, argv in ((compare_logits.main, ["--mcore-dir", "m", "--hf-dir", "h", "--seq-length", "0"]),
                       (evaluate.cli, ["--model", "m", "--data", "d", "--catalog", "c", "--out", "o", "--batch-size",
                                       "0"]),
                       (make_synthetic_benchmark.main, ["--synthetic-catalog", "s", "--catalog", "c", "--out", "o",
                                                        "--users", "0"])):
        with pytest.raises(SystemExit) as stop:  # bad usage: argparse's one line, exit 2
            main(argv)
        assert stop.value.code == 2 and "must be >= " in capsys.readouterr().err
    damaged = tmp_path / "damaged"
    shutil.copytree(tokenizers["x32"], damaged)
    text = (damaged / "tokenizer.json").read_text()
    (damaged / "tokenizer.json").write_text(text[:len(text) // 2])  # a copy that stopped half-way
    why = f"{damaged}/tokenizer.json: damaged, not a readable tokenizer (EOF while parsing"
    assert preprocess_data.main(["--input", str(empty), "--tokenizer", str(damaged), "--output-prefix",
                                 str(tmp_path / "p")]) == 1
    assert why in one_line(capsys.readouterr().err, "preprocess_data")
    assert evaluate.cli(["--model", str(damaged), "--data", "d", "--catalog", "c", "--out", str(tmp_path / "o")]) == 1
    assert why in one_line(capsys.readouterr().err, "evaluate")
    assert sorted(os.listdir(tmp_path)) == ["catalog", "damaged", "prompts.jsonl"]
