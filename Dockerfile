# GPU cluster image: NGC PyTorch (Python 3.12, CUDA, Transformer Engine and apex inside) + vLLM + megatron_onereason.
#   docker build -t megatron-onereason .                      # training + the vLLM rollout engine
#   docker build --build-arg WITH_VLLM=0 -t megatron-onereason .  # training only (any BASE)
#   docker run --gpus 1 megatron-onereason bash benchmarks/gpu_check.sh --out /tmp/gpu_check.md   # its own GPU check
#   (SLURM + pyxis/enroot: srun --container-image=megatron-onereason ...; see examples/)
# Versions: those CI tests (requirements/lock-cpu.txt; tests/examples/test_dockerfile.py keeps them equal).
#
# vLLM version: the rollout backend supports vLLM 0.32.x only (generation/vllm_backend.py). vLLM 0.32's wheels pin
# torch==2.13.0, so `pip install vllm` would replace the container's PyTorch (and break TE and apex, built against
# it). vLLM is built from source against the container's PyTorch instead (vLLM's documented route for an existing
# PyTorch: use_existing_torch.py), which needs a BASE whose PyTorch is 2.13 — the release vLLM 0.32 is written
# against. NGC releases ship the next PyTorch about a month before upstream (25.09: 2.9.0a0, 25.12: 2.10.0a0);
# the default below is expected to carry 2.13: the check in the vLLM step stops the build with the way out if not.
ARG BASE=nvcr.io/nvidia/pytorch:26.07-py3
FROM ${BASE}

ENV PYTHONUNBUFFERED=1 \
    CUDA_DEVICE_MAX_CONNECTIONS=1 \
    NVTE_FUSED_ATTN=1 \
    TORCH_NCCL_AVOID_RECORD_STREAMS=1

# Before COPYing our sources: the vLLM build (long) stays cached while they change.
ARG WITH_VLLM=1
ARG VLLM_VERSION=0.32.0
# Hopper and Blackwell (add 8.0 for A100); the vLLM kernels compile for these only, which keeps the build shorter.
ARG TORCH_CUDA_ARCH_LIST="9.0 10.0"
ARG MAX_JOBS=16
RUN if [ "$WITH_VLLM" = 1 ]; then \
      python -c "import sys, torch; v = torch.__version__; sys.exit(0 if v.startswith('2.13') else \
'vLLM ${VLLM_VERSION} needs the container PyTorch 2.13, this BASE has ' + v + ': pass --build-arg BASE=<an NGC \
PyTorch release with PyTorch 2.13>, or --build-arg WITH_VLLM=0 for a training-only image')" \
   && git clone --depth 1 --branch v${VLLM_VERSION} https://github.com/vllm-project/vllm.git /tmp/vllm \
   && cd /tmp/vllm && python use_existing_torch.py \
   && pip install --no-cache-dir -r requirements/build.txt \
   && TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST}" MAX_JOBS=${MAX_JOBS} \
      pip install --no-cache-dir --no-build-isolation . \
   && cd / && rm -rf /tmp/vllm \
   && python -c "import torch, vllm; print('vLLM', vllm.__version__, 'on torch', torch.__version__)"; \
    fi

WORKDIR /opt/megatron_onereason
COPY setup.py pyproject.toml README.md ./
COPY megatron_onereason ./megatron_onereason
COPY tools ./tools
COPY checkpoints_convert ./checkpoints_convert
COPY examples ./examples
COPY benchmarks ./benchmarks
COPY requirements ./requirements

# Keep the container's torch, TE and apex: install megatron-core and transformers at the tested versions, then our
# package against them, without letting pip replace torch. Check TE is importable so FP8/thd paths are available.
ARG MEGATRON_CORE_VERSION=0.16.1
ARG TRANSFORMERS_VERSION=5.19.0
RUN python -c "import torch, transformer_engine; print('torch', torch.__version__, 'TE', transformer_engine.__version__)" \
 && pip install --no-cache-dir "megatron-core==${MEGATRON_CORE_VERSION}" "transformers==${TRANSFORMERS_VERSION}" \
 && pip install --no-cache-dir --no-build-isolation -e ".[dev]" \
 && python -c "import megatron.core, transformers, megatron_onereason; \
print('megatron-core', megatron.core.__version__, 'transformers', transformers.__version__)"
