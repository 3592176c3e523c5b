"""Qwen3 architecture as a typed config, with presets equal to the released Qwen3 shapes.

Only architecture lives here (what a HF ``config.json`` says); how the model is built — parallelism,
precision, FP8, layer spec — is passed to :func:`megatron_onereason.model.build_qwen3_model`.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Dict, Union


@dataclass(frozen=True)
class Qwen3Config:
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int  # key/value heads (GQA)
    head_dim: int
    vocab_size: int  # true vocabulary size (rows that mean something); padding is added at build time
    rope_theta: float = 1_000_000.0
    norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 40960

    def __post_init__(self):
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_query_groups={self.num_query_groups}"
            )
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v <= 0:
                raise ValueError(f"Qwen3Config.{f.name} must be positive, got {v}")

    # ----------------------------------------------------------------------------------------- HF config.json
    def to_hf_dict(self) -> Dict[str, Any]:
        """Fields of a ``transformers.Qwen3Config`` ``config.json``."""
        return {
            "architectures": ["Qwen3ForCausalLM"],
            "model_type": "qwen3",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.ffn_hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_query_groups,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "use_cache": True,
        }

    @classmethod
    def from_hf_dict(cls, d: Dict[str, Any], source: str = "config.json") -> "Qwen3Config":
        """Read a HF ``config.json`` dict; refuse anything that is not a plain Qwen3 decoder."""
        model_type = d.get("model_type")
        if model_type != "qwen3":
            raise ValueError(f"{source}: model_type is {model_type!r}, only 'qwen3' is supported")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: hidden_act {d['hidden_act']!r} is not Qwen3's silu")
        if d.get("attention_bias", False):
            raise ValueError(f"{source}: attention_bias=true is not a Qwen3 layout")
        rope_theta = d.get("rope_theta")
        if rope_theta is None:  # transformers >= 5 nests it under rope_parameters
            rope_theta = (d.get("rope_parameters") or {}).get("rope_theta", 1_000_000.0)
        scaling = d.get("rope_scaling") or {}
        if scaling and scaling.get("rope_type", scaling.get("type", "default")) not in ("default", None):
            raise ValueError(f"{source}: rope_scaling {scaling} is not supported")
        try:
            heads = d["num_attention_heads"]
            return cls(
                num_layers=d["num_hidden_layers"],
                hidden_size=d["hidden_size"],
                ffn_hidden_size=d["intermediate_size"],
                num_attention_heads=heads,
                num_query_groups=d.get("num_key_value_heads", heads),
                head_dim=d.get("head_dim") or d["hidden_size"] // heads,
                vocab_size=d["vocab_size"],
                rope_theta=float(rope_theta),
                norm_eps=d.get("rms_norm_eps", 1e-6),
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                max_position_embeddings=d.get("max_position_embeddings", 40960),
            )
        except KeyError as e:
            raise ValueError(f"{source}: missing field {e}") from None

    @classmethod
    def from_hf_dir(cls, hf_dir: str) -> "Qwen3Config":
        path = os.path.join(hf_dir, "config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: not found (expected a HF model directory)")
        return cls.from_hf_dict(_read_json(path), source=path)

    # ----------------------------------------------------------------------------------------- helpers
    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Qwen3Config":
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

    def with_vocab_size(self, vocab_size: int) -> "Qwen3Config":
        return replace(self, vocab_size=vocab_size)

    def num_parameters(self) -> int:
        """Parameters of the HF model (true vocab, tied embeddings counted once)."""
        h, f, d = self.hidden_size, self.ffn_hidden_size, self.head_dim
        attn = h * d * (self.num_attention_heads + 2 * self.num_query_groups) + self.num_attention_heads * d * h
        layer = attn + 3 * h * f + 2 * h + 2 * d
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + emb + h


def _read_json(path: str) -> Dict[str, Any]:
    try:
        with open(path) as f:
            data = json.load(f)
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def padded_vocab_size(vocab_size: int, tensor_parallel_size: int = 1, divisible_by: int = 128) -> int:
    """Megatron's padding: a multiple of ``divisible_by × TP`` so every TP shard gets an aligned slice.

    A checkpoint keeps the padded size it was written with; it loads at any TP that divides that size.
    """
    multiple = divisible_by * tensor_parallel_size
    return int(math.ceil(vocab_size / multiple) * multiple)


QWEN3_VOCAB = 151936
_PRESETS: Dict[str, Qwen3Config] = {
    # A tiny model for CPU tests and the embedded demo: GQA (4 heads, 2 groups), 4 layers so PP=2 and TP=2 work.
    "tiny": Qwen3Config(4, 64, 192, 4, 2, 64, 1024, tie_word_embeddings=True, max_position_embeddings=8192),
    # Released Qwen3 shapes (huggingface.co/Qwen/Qwen3-*/config.json).
    "0.6b": Qwen3Config(28, 1024, 3072, 16, 8, 128, QWEN3_VOCAB, tie_word_embeddings=True),
    "1.7b": Qwen3Config(28, 2048, 6144, 16, 8, 128, QWEN3_VOCAB, tie_word_embeddings=True),
    "4b": Qwen3Config(36, 2560, 9728, 32, 8, 128, QWEN3_VOCAB, tie_word_embeddings=True),
    "8b": Qwen3Config(36, 4096, 12288, 32, 8, 128, QWEN3_VOCAB, tie_word_embeddings=False),
    "14b": Qwen3Config(40, 5120, 17408, 40, 8, 128, QWEN3_VOCAB, tie_word_embeddings=False),
}


def qwen3_preset(name: str) -> Qwen3Config:
    try:
        return _PRESETS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown Qwen3 preset {name!r}; known: {sorted(_PRESETS)}") from None


def load_qwen3_config(spec: Union[str, Qwen3Config]) -> Qwen3Config:
    """A preset name, a HF model directory, or a ``config.json`` path."""
    if isinstance(spec, Qwen3Config):
        return spec
    if os.path.isdir(spec):
        return Qwen3Config.from_hf_dir(spec)
    if os.path.isfile(spec):
        return Qwen3Config.from_hf_dict(_read_json(spec), source=spec)
    return qwen3_preset(spec)
