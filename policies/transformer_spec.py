"""The shape of a decoder-only transformer, as the performance model needs it.

Llama family: gated (SwiGLU) MLP, RMSNorm, rotary embeddings, grouped-query attention.
Units: parameters, bytes, tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1}


@dataclass(frozen=True)
class TransformerSpec:
    """A model's shape; `params` is its published parameter count."""

    name: str
    params: int
    layers: int
    hidden_size: int
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads (< num_heads with grouped-query attention)
    head_dim: int
    intermediate_size: int  # MLP width (each of gate and up)
    vocab_size: int
    dtype_bytes: int = 2  # bytes per weight and per KV element

    def __post_init__(self) -> None:
        for field in ("params", "layers", "hidden_size", "num_heads", "num_kv_heads",
                      "head_dim", "intermediate_size", "vocab_size", "dtype_bytes"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"TransformerSpec {self.name!r}: {field} must be a positive "
                                 f"integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"TransformerSpec {self.name!r}: num_heads ({self.num_heads}) must "
                             f"be a multiple of num_kv_heads ({self.num_kv_heads})")

    @property
    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes one token takes over all layers (K and V)."""
        return 2 * self.layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def weight_bytes(self) -> int:
        return self.params * self.dtype_bytes

    def check_tp(self, tp: int) -> None:
        """Raise ValueError unless the heads split evenly over `tp` GPUs (vLLM's rule:
        query heads divide by tp; KV heads divide by tp, or tp by them and are replicated)."""
        if not isinstance(tp, int) or tp < 1:
            raise ValueError(f"tp must be a positive integer, got {tp!r}")
        if self.num_heads % tp or (self.num_kv_heads % tp and tp % self.num_kv_heads):
            raise ValueError(f"{self.name}: tp={tp} does not split {self.num_heads} query heads "
                             f"and {self.num_kv_heads} KV heads evenly")

    def kv_heads_per_gpu(self, tp: int = 1) -> int:
        self.check_tp(tp)
        return max(1, self.num_kv_heads // tp)

    def weight_bytes_per_gpu(self, tp: int = 1) -> int:
        """Weight bytes each of `tp` GPUs holds (weights shard evenly; the replicated
        norms are under 0.01% and ignored)."""
        self.check_tp(tp)
        return -(-self.weight_bytes // tp)

    def kv_bytes_per_token_per_gpu(self, tp: int = 1) -> int:
        """KV-cache bytes one token takes on each of `tp` GPUs."""
        return 2 * self.layers * self.kv_heads_per_gpu(tp) * self.head_dim * self.dtype_bytes

    def shape_params(self, tied_embeddings: bool = False) -> int:
        """The parameter count the shape implies (no biases)."""
        h, hd = self.hidden_size, self.head_dim
        attention = h * (self.num_heads + 2 * self.num_kv_heads) * hd + self.num_heads * hd * h
        layer = attention + 3 * h * self.intermediate_size + 2 * h
        embeddings = self.vocab_size * h * (1 if tied_embeddings else 2)
        return self.layers * layer + embeddings + h

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any], name: str) -> TransformerSpec:
        """The shape of a Hugging Face `config.json` (LlamaConfig fields); the parameter
        count is computed from it."""
        def need(key: str) -> int:
            if key not in config:
                raise ValueError(f"config.json of {name!r} lacks {key!r}")
            return int(config[key])

        hidden, heads = need("hidden_size"), need("num_attention_heads")
        dtype = str(config.get("torch_dtype") or config.get("dtype") or "float16")
        if dtype not in _DTYPE_BYTES:
            raise ValueError(f"config.json of {name!r}: unknown dtype {dtype!r} "
                             f"(known: {', '.join(_DTYPE_BYTES)})")
        head_dim = config.get("head_dim") or hidden // heads
        spec = cls(name=name, params=1, layers=need("num_hidden_layers"), hidden_size=hidden,
                   num_heads=heads, num_kv_heads=int(config.get("num_key_value_heads") or heads),
                   head_dim=int(head_dim), intermediate_size=need("intermediate_size"),
                   vocab_size=need("vocab_size"), dtype_bytes=_DTYPE_BYTES[dtype])
        tied = bool(config.get("tie_word_embeddings", False))
        return replace(spec, params=spec.shape_params(tied))


def _llama(name: str, params: int, layers: int, hidden: int, heads: int, kv_heads: int,
           intermediate: int, vocab: int) -> TransformerSpec:
    return TransformerSpec(name, params, layers, hidden, heads, kv_heads, hidden // heads,
                           intermediate, vocab)


# Published shapes (the models' config.json) and parameter counts, bf16/fp16 weights.
MODEL_PRESETS: Mapping[str, TransformerSpec] = MappingProxyType({
    "llama-2-7b": _llama("llama-2-7b", 6_738_415_616, 32, 4096, 32, 32, 11008, 32000),
    "llama-2-13b": _llama("llama-2-13b", 13_015_864_320, 40, 5120, 40, 40, 13824, 32000),
    "llama-2-70b": _llama("llama-2-70b", 68_976_648_192, 80, 8192, 64, 8, 28672, 32000),
    "llama-3-8b": _llama("llama-3-8b", 8_030_261_248, 32, 4096, 32, 8, 14336, 128256),
    "llama-3-70b": _llama("llama-3-70b", 70_553_706_496, 80, 8192, 64, 8, 28672, 128256),
})
