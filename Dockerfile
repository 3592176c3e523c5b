# GPU cluster image: NGC PyTorch (Python 3.12, CUDA, Transformer Engine and apex inside) + megatron_onereason.
#   docker build -t megatron-onereason .
#   (SLURM + pyxis/enroot: srun --container-image=megatron-onereason ...; see examples/)
ARG BASE=nvcr.io/nvidia/pytorch:25.09-py3
FROM ${BASE}

ENV PYTHONUNBUFFERED=1 \
    CUDA_DEVICE_MAX_CONNECTIONS=1 \
    NVTE_FUSED_ATTN=1 \
    TORCH_NCCL_AVOID_RECORD_STREAMS=1

WORKDIR /opt/megatron_onereason
COPY setup.py README.md ./
COPY megatron_onereason ./megatron_onereason
COPY tools ./tools
COPY checkpoints_convert ./checkpoints_convert
COPY examples ./examples

# Keep the container's torch, TE and apex: install megatron-core (0.16-0.19 supported) and our package against
# them without letting pip replace torch. Check TE is importable so FP8/thd paths are available at run time.
RUN python -c "import torch, transformer_engine; print('torch', torch.__version__, 'TE', transformer_engine.__version__)" \
 && pip install --no-cache-dir "megatron-core>=0.16,<0.20" \
 && pip install --no-cache-dir --no-build-isolation -e ".[dev]" \
 && python -c "import megatron.core, megatron_onereason; print('megatron-core', megatron.core.__version__)"
