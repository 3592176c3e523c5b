"""rl.run against a Ray cluster started with token authentication, without the token: one line that says to export
RAY_AUTH_TOKEN (Ray itself only says it failed to connect)."""
import os
import shutil
import socket
import subprocess
import sys
import tempfile

import psutil
import pytest

from conftest import REPO
from megatron_onereason.tools import make_synthetic_benchmark

pytestmark = pytest.mark.multiprocess
RAY = os.path.join(os.path.dirname(sys.executable), "ray")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def token_cluster():
    """A one-CPU Ray head requiring a token; stopped by killing its own processes (never `ray stop`: that stops
    every cluster on the machine)."""
    temp_dir, port = tempfile.mkdtemp(prefix="ray-auth-"), _free_port()  # short: Ray's socket paths have a limit
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="pkg-test-token-0123456789abcdef")
    started = subprocess.run([RAY, "start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
                              f"--temp-dir={temp_dir}", "--node-ip-address=127.0.0.1"], env=env, capture_output=True,
                             text=True, timeout=120)
    assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
    try:
        yield f"127.0.0.1:{port}"
    finally:
        mine = [p for p in psutil.process_iter(["cmdline"]) if temp_dir in " ".join(p.info["cmdline"] or [])]
        for p in mine:
            p.kill()
        psutil.wait_procs(mine, timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_driver_without_the_token_is_told_to_export_it(tiny_recommender, token_cluster, tmp_path):
    benchmark = str(tmp_path / "bench.jsonl")
    assert make_synthetic_benchmark.main(["--synthetic-catalog", tiny_recommender.synthetic_dir, "--catalog",
                                          tiny_recommender.catalog_dir, "--out", benchmark, "--users", "4"]) == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_onereason.rl.run", "algorithm=rft", "rollout.backend=hf",
         f"rollout.model_dir={tiny_recommender.model_dir}", f"data.catalog={tiny_recommender.catalog_dir}",
         f"data.benchmark={benchmark}", f"rft_output={tmp_path / 'rft.jsonl'}", f"ray.address={token_cluster}"],
        cwd=REPO, env=dict(env, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("rl.run: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith(f"rl.run: error: ray.address={token_cluster}: Failed to connect to Ray cluster")
    assert "export RAY_AUTH_TOKEN=<the head's token> here as on the head node" in errors[0]
