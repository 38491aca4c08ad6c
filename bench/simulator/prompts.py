"""Synthetic prompts: what the simulator hands engines and routers for an `Arrival`.

A trace gives lengths, not text, so a simulated prompt is named rather than spelled:
its full KV blocks get chained 64-bit names (the role `policies.block_hash` plays live),
those wholly inside a shared prefix named after the prefix group, the rest after the
request. Equal names mean equal content exactly where a real prefix would be shared,
and the router's prefix scorer and the engines' prefix caches see the same names.

The token ids are a placeholder of the right length (engines only count and key them;
each request's seed, its number, keeps output streams distinct). Names use Python's
hash of int tuples, which is not salted, so a run is reproducible across processes.
"""

from __future__ import annotations

import numpy as np

from actors.engines.base import GenerationRequest, SamplingSpec
from bench.simulator.workload import Arrival

_MASK = (1 << 64) - 1
_GROUP = 1  # the key space of shared prefixes (requests' own blocks: `_splitmix`)
_STRIDE = 1 << 20  # block positions per request in the splitmix counter space


class PromptNamer:
    """Block names and placeholder requests of one model (`block_size` tokens per block)."""

    def __init__(self, model: str, block_size: int):
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.model = model
        self.block_size = block_size
        self._groups: dict[int, list[int]] = {}  # group -> names of its prefix's blocks so far
        self._placeholders: dict[int, tuple[int, ...]] = {}

    def hashes(self, arrival: Arrival) -> tuple[int, ...]:
        """Names of the prompt's full blocks, in order.

        Blocks past the shared prefix belong to this request alone, so their names need
        no chaining to stay unique (any block after the request's first own block is
        the request's too): splitmix64 of (request, position), one numpy call.
        """
        full = arrival.prompt_tokens // self.block_size
        shared = min(full, arrival.prefix_tokens // self.block_size) if arrival.prefix_group >= 0 else 0
        names = self._group_names(arrival.prefix_group, shared) if shared else []
        if full > shared:
            names += _splitmix(np.arange(arrival.number * _STRIDE + shared, arrival.number * _STRIDE + full,
                                         dtype=np.uint64)).tolist()
        return tuple(names)

    def request(self, arrival: Arrival) -> GenerationRequest:
        """The engine request of `arrival`: placeholder ids, `output_tokens` to generate."""
        prompt = self._placeholders.get(arrival.prompt_tokens)
        if prompt is None:
            prompt = self._placeholders[arrival.prompt_tokens] = (0,) * arrival.prompt_tokens
        sampling = SamplingSpec(max_tokens=arrival.output_tokens, seed=arrival.number, ignore_eos=True)
        return GenerationRequest(f"r{arrival.number}", self.model, prompt, sampling,
                                 slo_class=arrival.slo_class)

    def _group_names(self, group: int, blocks: int) -> list[int]:
        names = self._groups.setdefault(group, [])
        key = hash((_GROUP, group))
        while len(names) < blocks:
            parent = names[-1] if names else 0
            names.append(hash((parent, key, len(names))) & _MASK)
        return names[:blocks]


_GOLDEN, _MUL1, _MUL2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_SHIFT1, _SHIFT2, _SHIFT3 = np.uint64(30), np.uint64(27), np.uint64(31)


def _splitmix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser over uint64 counters: distinct in, distinct out (a bijection).
    Overwrites `x` (one call per request: in place, it builds no temporaries)."""
    x += _GOLDEN
    x ^= x >> _SHIFT1
    x *= _MUL1
    x ^= x >> _SHIFT2
    x *= _MUL2
    x ^= x >> _SHIFT3
    return x
