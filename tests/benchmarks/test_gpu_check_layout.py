"""benchmarks/gpu_check.sh on the lent GPU machine's layout, simulated on CPU.

There, ``python3`` is itself a virtual environment that holds torch and most of what the check imports, but not
megatron-core (and transformers at another version); nothing can be fetched. Here: a venv whose site-packages holds
everything of this project's venv *except* the distributions of ``gpu_check_requirements.txt`` (linked, not copied),
first on PATH, no package index reachable, and a wheels directory made offline from this venv's installed files.
The script must install those wheels over that python (no nested venv: one made from inside a venv loses the parent
venv's torch) and every step's imports must work there (the ``env`` step imports them all).
"""
import csv
import hashlib
import importlib.metadata
import io
import os
import subprocess
import sys
import sysconfig
import zipfile

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
from gpu_check import STEP_MODULES, pinned_versions  # noqa: E402


def top_level(dist) -> set:
    return {str(f).split("/")[0] for f in dist.files if not str(f).startswith("..")}


def repack_wheel(dist, out_dir: str) -> str:
    """A py3-none-any wheel of an installed distribution, from its files (what ``pip wheel`` would need a source
    tree or an index for)."""
    name = dist.metadata["Name"].replace("-", "_")
    info = f"{name}-{dist.version}.dist-info"
    path = os.path.join(out_dir, f"{name}-{dist.version}-py3-none-any.whl")
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as whl:
        for f in dist.files:
            rel = str(f)
            if rel.startswith("..") or "__pycache__" in rel or rel.startswith(info) or not f.locate().is_file():
                continue
            data = f.locate().read_bytes()
            whl.writestr(rel, data)
            digest = hashlib.sha256(data).hexdigest()
            writer.writerow([rel, f"sha256={digest}", len(data)])
        whl.writestr(f"{info}/METADATA", dist.read_text("METADATA"))
        whl.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        writer.writerows([[f"{info}/METADATA", "", ""], [f"{info}/WHEEL", "", ""], [f"{info}/RECORD", "", ""]])
        whl.writestr(f"{info}/RECORD", record.getvalue())
    return path


def torch_only_venv(root) -> str:
    """A venv (made by this venv's base interpreter) holding every package of this venv but the pinned ones."""
    subprocess.run([os.path.join(sys.base_prefix, "bin", "python3"), "-m", "venv", "--without-pip", str(root)],
                   check=True)
    here = sysconfig.get_paths()["purelib"]
    (site,) = [os.path.join(dp, d) for dp, dirs, _ in os.walk(root / "lib") for d in dirs if d == "site-packages"]
    carried = set()
    for name in [*pinned_versions(), "megatron_onereason"]:  # the checkout comes from the repository itself
        dist = importlib.metadata.distribution(name)
        carried |= top_level(dist) | {str(dist._path.name)}
    for entry in os.listdir(here):
        if entry in carried or entry == "__pycache__" or "megatron_onereason" in entry:
            continue
        os.symlink(os.path.join(here, entry), os.path.join(site, entry))
    return str(root / "bin")


def test_script_installs_the_pinned_wheels_over_a_python_that_is_a_venv(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for name, version in pinned_versions().items():
        dist = importlib.metadata.distribution(name)
        assert dist.version == version, f"this venv has {name} {dist.version}, the check pins {version}"
        repack_wheel(dist, str(wheels))
    bin_dir = torch_only_venv(tmp_path / "venv")
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "TMPDIR": str(tmp_path),
           "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_CONFIG_FILE": os.devnull, "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    probe = subprocess.run(["python3", "-c", "import torch, megatron.core"], env=env, capture_output=True, text=True)
    assert "No module named 'megatron'" in probe.stderr  # torch is there, megatron-core only comes from the wheels

    out = tmp_path / "results.md"
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--wheels", str(wheels), "--dry-run", "--steps", "env",
                           "--out", str(out), "--work", str(tmp_path / "work")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (row,) = [line for line in out.read_text().splitlines() if line.startswith("| env |")]
    pins = pinned_versions()
    assert row.startswith("| env | PASS |") and "pins: as pinned" in row
    assert f"megatron-core: {pins['megatron-core']}" in row and f"transformers: {pins['transformers']}" in row
    assert f"step imports: {len(STEP_MODULES)} modules" in row
    site = tmp_path / "onereason-gpu-check-site"  # the --target directory, not the venv
    assert (site / "megatron" / "core").is_dir() and (site / "transformers").is_dir()
