"""The package as users install it: console scripts outside a checkout, and a converter-only install that never
imports the extras (ray, faiss, vLLM, wandb)."""
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO

EXTRAS_MODULES = ("ray", "faiss", "vllm", "wandb")
# the commands of a base install (no extra): converters, vocabulary tools, preprocessing, trainer, planner
BASE_COMMANDS = ["megatron_onereason.tools.hf_to_mcore", "megatron_onereason.tools.mcore_to_hf",
                 "megatron_onereason.tools.extend_vocab", "megatron_onereason.tools.import_itemic_vocab",
                 "megatron_onereason.tools.make_tiny_qwen3", "megatron_onereason.tools.preprocess_data",
                 "megatron_onereason.tools.plan_packs", "megatron_onereason.tools.compare_logits",
                 "megatron_onereason.tools.summarize_metrics", "megatron_onereason.train", "megatron_onereason.plan",
                 "megatron_onereason.evaluate", "megatron_onereason.launch"]


def _scripts():
    import tomllib

    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]["scripts"]


def test_every_command_has_a_console_script():
    targets = {v.split(":")[0] for v in _scripts().values()}
    modules = {f"megatron_onereason.tools.{n[:-3]}" for n in os.listdir(os.path.join(REPO, "megatron_onereason", "tools"))
               if n.endswith(".py") and n != "__init__.py"}
    assert modules | {"megatron_onereason.train", "megatron_onereason.plan", "megatron_onereason.evaluate",
                      "megatron_onereason.rl.run", "megatron_onereason.launch"} == targets
    for name, target in _scripts().items():  # each entry point exists and is callable
        module, function = target.split(":")
        assert callable(getattr(__import__(module, fromlist=[function]), function)), name


def test_converter_only_install_neither_needs_nor_imports_the_extras(tiny_hf_dirs, tmp_path):
    """A process where ray / faiss / vllm / wandb cannot be imported (as in a venv without the extras) imports every
    base command, converts a checkpoint, and the commands that need an extra say which one."""
    script = textwrap.dedent(f"""
        import importlib, sys
        BLOCKED = {EXTRAS_MODULES!r}

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

        sys.meta_path.insert(0, Block())
        for module in {BASE_COMMANDS!r}:
            importlib.import_module(module)
        from megatron_onereason.tools import build_itemic_tokenizer, hf_to_mcore
        assert hf_to_mcore.main(["--hf-dir", {tiny_hf_dirs["tied"]!r}, "--out-dir", {str(tmp_path / "mc")!r},
                                 "--no-tokenizer"]) == 0
        code = build_itemic_tokenizer.main(["--embeddings", "x.npy", "--ids", "x.txt", "--domain", "video",
                                            "--out", {str(tmp_path / "tok")!r}, "--threads", "1"])
        assert code == 1, code
        loaded = sorted({{m.split(".")[0] for m in sys.modules}} & set(BLOCKED))
        assert not loaded, loaded
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "build_itemic_tokenizer: error: RQ-KMeans item codes needs the faiss package, which is not installed: " \
           "pip install 'megatron_onereason[tokenizer]'" in proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("ONEREASON_TEST_INSTALL"),
                    reason="installs torch and the base dependencies into a new venv (minutes): "
                           "ONEREASON_TEST_INSTALL=1 to run")
def test_pip_install_gives_working_console_scripts_outside_the_checkout(tmp_path):
    """``pip install .`` with the lock's versions into a clean venv: every console script answers --help from a
    directory that is not the checkout, and the base install holds none of the extras."""
    source = tmp_path / "src"  # a copy: the build must not write build/ or *.egg-info into the checkout
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(os.path.join(REPO, name), source)
    shutil.copytree(os.path.join(REPO, "megatron_onereason"), source / "megatron_onereason",
                    ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # torch first, as tools/setup_venv.sh does: the pinned CPU build, not an unpinned CUDA one
    subprocess.run([*pip, "torch==2.13.0"], check=True, env=env, cwd=tmp_path)
    subprocess.run([*pip, "-c", os.path.join(REPO, "requirements", "lock-cpu.txt"), str(source)], check=True,
                   env=env, cwd=tmp_path)
    check = subprocess.run([str(venv / "bin" / "python"), "-c", "import importlib.util as u; "
                            f"print([m for m in {EXTRAS_MODULES!r} if u.find_spec(m)])"],
                           capture_output=True, text=True, env=env, cwd=tmp_path, check=True)
    assert check.stdout.strip() == "[]"
    for name in _scripts():
        proc = subprocess.run([str(venv / "bin" / name), "--help"], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=300)
        assert proc.returncode == 0 and proc.stdout.startswith(f"usage: {name}"), (name, proc.stderr[-2000:])
