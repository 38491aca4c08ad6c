"""How long one engine step takes on a GPU type: a roofline per operator group.

Every step is a list of operator calls (projections, MLP, attention, elementwise kernels,
tensor-parallel all-reduce, the LM head), each with its FLOPs and bytes moved on one GPU.
A call takes `latency + max(FLOPs / (peak × MFU), bytes / (bandwidth × MBU))`, with the
group's factors from `policies.gpu_catalog.Efficiency` (fitted to measured timings by
`bench.perfmodel_check`); a step adds a fixed overhead. A `MeasuredProfile` overrides the
model wherever it covers a call (or a whole prefill/decode step).

Which calls are compute-bound and which memory-bound stays visible in `StepBreakdown`: a
power cap slows compute-bound work about with the SM clock and memory-bound decode barely.
Units: seconds, tokens, bytes, FLOP/s, bytes/s.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

from policies.gpu_catalog import (
    EFFICIENCY_CATALOG,
    GPU_CATALOG,
    Efficiency,
    GpuSpec,
    Roofline,
    default_efficiency,
    gpu_spec,
)
from policies.measured_profile import MeasuredProfile, ProfileRow
from policies.transformer_spec import MODEL_PRESETS, TransformerSpec

__all__ = [
    "EFFICIENCY_CATALOG", "GPU_CATALOG", "MODEL_PRESETS", "OPS", "OP_GROUP", "PHASES",
    "BatchShape", "Efficiency", "GpuSpec", "MeasuredProfile", "OpTime", "OpWork", "ProfileRow",
    "Roofline", "StepBreakdown", "StepTimeModel", "TransformerSpec", "allreduce_seconds",
    "default_efficiency", "gpu_spec", "roofline_seconds",
]

# operator -> efficiency group ("comm" is the all-reduce, timed by `allreduce_seconds`)
OP_GROUP: Mapping[str, str] = MappingProxyType({
    "embed": "elementwise", "norm": "elementwise", "qkv_proj": "proj", "rope": "elementwise",
    "kv_write": "elementwise", "attn_prefill": "attn_prefill", "attn_decode": "attn_decode",
    "out_proj": "proj", "residual_add": "elementwise", "mlp_up": "mlp",
    "mlp_act": "elementwise", "mlp_down": "mlp", "all_reduce": "comm", "lm_head": "lm_head",
})
OPS: tuple[str, ...] = tuple(OP_GROUP)
PHASES: tuple[str, ...] = ("prefill", "decode")
# operators called once per layer on every token, in step order (attention aside)
_PER_LAYER = ("qkv_proj", "rope", "kv_write", "out_proj", "residual_add", "mlp_up", "mlp_act", "mlp_down")
_DENSE_MEMO_SIZE = 1 << 16  # memoised dense partial sums per model: (tokens, logit rows) pairs


@dataclass(frozen=True)
class BatchShape:
    """The work of one engine step."""

    prefill_tokens: int = 0  # prompt tokens computed this step (all chunks together)
    # sum over computed prompt tokens of the context length each attends to (itself included)
    prefill_attention_pairs: int = 0
    decode_seqs: int = 0  # sequences producing one token each
    decode_context_tokens: int = 0  # sum of their context lengths (KV tokens read, new included)
    prefill_seqs: int = 0  # prompt chunks, each with logits for its last token (0: one if any)
    prefill_context_tokens: int = 0  # sum of the chunks' cached contexts (KV tokens read back)

    def __post_init__(self) -> None:
        p, a, d, c = self.prefill_tokens, self.prefill_attention_pairs, self.decode_seqs, self.decode_context_tokens
        s, x = self.prefill_seqs, self.prefill_context_tokens
        # Shapes are built per engine step: check the usual valid one in a single expression
        # (plain ints, then every rule below), and go field by field only to name a fault.
        if (type(p) is int and type(a) is int and type(d) is int and type(c) is int and type(s) is int
                and type(x) is int and d >= 0 and 0 <= s <= p <= a and x >= 0
                and (c > 0 if d else c == 0) and c >= d and (p or not (a or s or x))):
            return
        for name, value in vars(self).items():
            if not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"BatchShape.{name} must be a non-negative integer, got {value!r}")
        if self.prefill_tokens == 0 and (self.prefill_attention_pairs or self.prefill_seqs
                                         or self.prefill_context_tokens):
            raise ValueError("BatchShape: prefill fields are set but prefill_tokens is 0")
        if self.prefill_attention_pairs < self.prefill_tokens:
            raise ValueError("BatchShape.prefill_attention_pairs must be >= prefill_tokens "
                             "(each token attends at least to itself)")
        if self.prefill_seqs > self.prefill_tokens:
            raise ValueError("BatchShape.prefill_seqs must not exceed prefill_tokens")
        if self.decode_context_tokens < self.decode_seqs or (self.decode_context_tokens
                                                             and not self.decode_seqs):
            raise ValueError("BatchShape.decode_context_tokens must be >= decode_seqs, "
                             "and 0 when decode_seqs is 0")

    @classmethod
    def from_requests(cls, prefill_chunks: Iterable[tuple[int, int]] = (),
                      decode_contexts: Iterable[int] = ()) -> BatchShape:
        """A step of prompt chunks, each (new_tokens, context_before), and decode
        sequences, each given by its context length (tokens it attends to)."""
        tokens = pairs = chunks = cached = 0
        for new, before in prefill_chunks:
            if new < 1 or before < 0:
                raise ValueError(f"prefill chunk (new_tokens={new}, context_before={before}): "
                                 "new_tokens must be >= 1 and context_before >= 0")
            tokens, chunks, cached = tokens + new, chunks + 1, cached + before
            pairs += new * before + new * (new + 1) // 2
        contexts = list(decode_contexts)
        if any(c < 1 for c in contexts):
            raise ValueError(f"decode context lengths must be >= 1, got {min(contexts)}")
        return cls(tokens, pairs, len(contexts), sum(contexts), chunks, cached)

    @property
    def tokens(self) -> int:
        """Rows through the projections and MLP: prompt tokens plus one per decode sequence."""
        return self.prefill_tokens + self.decode_seqs

    @property
    def logit_rows(self) -> int:
        """Rows through the LM head: one per decode sequence and per prompt chunk."""
        return self.decode_seqs + max(self.prefill_seqs, 1 if self.prefill_tokens else 0)

    @property
    def is_empty(self) -> bool:
        return self.tokens == 0

    def prefill_equivalent_context(self) -> int | None:
        """Cached context of the single chunk with these prompt tokens and attention
        pairs (exact for one chunk), or None when no single chunk matches."""
        t = self.prefill_tokens
        if t == 0:
            return None
        extra = self.prefill_attention_pairs - t * (t + 1) // 2
        return round(extra / t) if extra >= 0 else None


@dataclass(frozen=True)
class OpWork:
    """One operator call on one GPU: its work, and its key into a MeasuredProfile."""

    op: str
    flops: float
    bytes: float
    size: int  # tokens (sequences for attn_decode)
    context: int | None  # per-sequence context (0 where irrelevant; None: no profile lookup)
    calls: int = 1  # times per step (per-layer operators: once per layer)


@dataclass(frozen=True)
class OpTime:
    """The time of one call of `op`, and whether the roofline calls it compute-bound."""

    op: str
    seconds: float
    compute_bound: bool
    measured: bool  # taken from the profile rather than the roofline
    calls: int = 1


@dataclass(frozen=True)
class StepBreakdown:
    """Where one step's time goes (seconds). Under a power cap `compute_s` stretches
    about with the SM clock while `memory_s` (weight and KV reads) barely moves."""

    compute_s: float = 0.0  # compute-bound operator calls
    memory_s: float = 0.0  # memory-bound operator calls
    comm_s: float = 0.0  # tensor-parallel all-reduce
    overhead_s: float = 0.0  # fixed per-step cost (scheduling, input prep, sampling)

    @property
    def total_s(self) -> float:
        return self.compute_s + self.memory_s + self.comm_s + self.overhead_s

    def scaled(self, factor: float) -> StepBreakdown:
        return StepBreakdown(self.compute_s * factor, self.memory_s * factor,
                             self.comm_s * factor, self.overhead_s * factor)


def _times(work: OpWork, calls: int) -> OpWork:
    """`work` called `calls` times per step (built directly: `dataclasses.replace` is slow)."""
    return OpWork(work.op, work.flops, work.bytes, work.size, work.context, calls)


def roofline_seconds(flops, nbytes, gpu: GpuSpec, roofline: Roofline):
    """Seconds of one kernel call doing `flops` and moving `nbytes` (floats or arrays)."""
    return roofline.latency_s + np.maximum(flops / (gpu.bf16_flops * roofline.mfu),
                                           nbytes / (gpu.hbm_bytes_per_s * roofline.mbu))


def allreduce_seconds(nbytes, tp: int, gpu: GpuSpec, efficiency: Efficiency):
    """Seconds of a ring all-reduce of `nbytes` (per GPU) over `tp` GPUs: a fixed latency
    plus 2(tp-1)/tp of the bytes over the link's bus bandwidth (floats or arrays)."""
    if tp == 1:
        return 0.0 * nbytes
    busbw = gpu.interconnect_bytes_per_s * efficiency.allreduce_busbw_fraction
    return efficiency.allreduce_latency_s + 2 * (tp - 1) / tp * nbytes / busbw


class StepTimeModel:
    """Step times of `model` on `tp` GPUs of type `gpu` (see the module's note)."""

    def __init__(self, gpu: GpuSpec, model: TransformerSpec, *, tp: int = 1,
                 profile: MeasuredProfile | None = None,
                 efficiency: Efficiency | None = None) -> None:
        model.check_tp(tp)
        if profile is not None:
            unknown = sorted(profile.keys() - set(OPS) - set(PHASES))
            if unknown:
                raise ValueError(f"profile keys {unknown} are unknown "
                                 f"(known: {', '.join(OPS + PHASES)})")
        self.gpu, self.model, self.tp, self.profile = gpu, model, tp, profile
        self.efficiency = efficiency if efficiency is not None else default_efficiency(gpu)
        self._q_heads = q = model.num_heads // tp
        self._kv_heads = kv = model.kv_heads_per_gpu(tp)
        h, hd, inter = model.hidden_size, model.head_dim, -(-model.intermediate_size // tp)
        # (K, N) of each GEMM on one GPU
        self._gemm_shapes = {"qkv_proj": (h, (q + 2 * kv) * hd), "out_proj": (q * hd, h),
                             "mlp_up": (h, 2 * inter), "mlp_down": (inter, h),
                             "lm_head": (h, -(-model.vocab_size // tp))}
        # elements moved per token; RMSNorm reads its row twice (variance, then scale), the
        # all-reduce's are its message
        self._elements = {"embed": 2 * h, "norm": 3 * h, "rope": 2 * (q + kv) * hd,
                          "kv_write": 4 * kv * hd, "residual_add": 3 * h, "mlp_act": 3 * inter,
                          "all_reduce": h}
        self._dense_memo: dict[tuple[int, int], tuple[float, float, float]] = {}

    def __repr__(self) -> str:
        return (f"StepTimeModel({self.gpu.name}, {self.model.name}, tp={self.tp}, "
                f"profile={'yes' if self.profile else 'no'})")

    # -- work ------------------------------------------------------------------------

    def op_work(self, op: str, size: int, context: int = 0) -> OpWork:
        """One call of `op` on one GPU for `size` tokens (sequences for attn_decode) at
        per-sequence `context` (attention only: the cached context before the prompt
        chunk, or the KV tokens each decode sequence reads)."""
        if size < 0 or context < 0:
            raise ValueError(f"op_work({op!r}): size and context must not be negative, "
                             f"got {size}, {context}")
        t = size
        if op == "attn_prefill":
            return self._attn_prefill(t, t * context + t * (t + 1) // 2, t + context, context)
        if op == "attn_decode":
            return self._attn_decode(t, t * context, context)
        if op not in self._gemm_shapes and op not in self._elements:
            raise KeyError(f"unknown operator {op!r} (known: {', '.join(OPS)})")
        flops, nbytes = self._dense_work(op, t)
        return OpWork(op, flops, nbytes, t, 0)

    def _dense_work(self, op: str, t: int) -> tuple[float, float]:
        """(FLOPs, bytes) of one call of a GEMM or elementwise operator `op` over `t` rows."""
        shape = self._gemm_shapes.get(op)
        if shape is not None:
            k, n = shape
            return 2 * t * k * n, self.model.dtype_bytes * (k * n + t * (k + n))
        return 0.0, self.model.dtype_bytes * t * self._elements[op]

    def _attn_prefill(self, tokens: int, pairs: int, kv_tokens: int,
                      context: int | None) -> OpWork:
        hd, q, kv, b = self.model.head_dim, self._q_heads, self._kv_heads, self.model.dtype_bytes
        return OpWork("attn_prefill", 4 * q * hd * pairs,
                      b * hd * (2 * kv * kv_tokens + 2 * q * tokens), tokens, context)

    def _attn_decode(self, seqs: int, kv_tokens: int, context: int) -> OpWork:
        hd, q, kv, b = self.model.head_dim, self._q_heads, self._kv_heads, self.model.dtype_bytes
        return OpWork("attn_decode", 4 * q * hd * kv_tokens,
                      b * hd * (2 * kv * kv_tokens + 2 * q * seqs), seqs, context)

    def step_ops(self, batch: BatchShape) -> tuple[OpWork, ...]:
        """Every operator call of one step, each with its count of calls."""
        if batch.is_empty:
            return ()
        return self._dense_ops(batch.tokens, batch.logit_rows) + self._attention_ops(batch)

    def _dense_ops(self, tokens: int, logit_rows: int) -> tuple[OpWork, ...]:
        """The calls whose work depends on the step's row counts alone: every operator
        but attention, in `step_ops` order."""
        return tuple(_times(self.op_work(op, size), calls) for op, size, calls in self._dense_calls(tokens, logit_rows))

    def _dense_calls(self, tokens: int, logit_rows: int) -> list[tuple[str, int, int]]:
        """(operator, size, calls per step) of `_dense_ops`, in its order."""
        layers = self.model.layers
        calls = [("embed", tokens, 1), ("norm", tokens, 2 * layers + 1), ("lm_head", logit_rows, 1)]
        calls += [(op, tokens, layers) for op in _PER_LAYER]
        if self.tp > 1:
            calls.append(("all_reduce", tokens, 2 * layers))
        return calls

    def _attention_ops(self, batch: BatchShape) -> tuple[OpWork, ...]:
        """The attention calls of step `batch`, after the dense ones in `step_ops` order."""
        layers, ops = self.model.layers, []
        if batch.prefill_tokens:
            work = self._attn_prefill(batch.prefill_tokens, batch.prefill_attention_pairs,
                                      batch.prefill_tokens + batch.prefill_context_tokens,
                                      batch.prefill_equivalent_context())
            ops.append(_times(work, layers))
        if batch.decode_seqs:
            ctx = batch.decode_context_tokens
            work = self._attn_decode(batch.decode_seqs, ctx, round(ctx / batch.decode_seqs))
            ops.append(_times(work, layers))
        return tuple(ops)

    # -- time ------------------------------------------------------------------------

    def op_time(self, work: OpWork) -> OpTime:
        """The time of one call of `work`: measured where the profile covers it, else
        the roofline (the all-reduce: `allreduce_seconds`)."""
        seconds, compute_bound, measured = self._seconds(work.op, work.flops, work.bytes, work.size, work.context)
        return OpTime(work.op, seconds, compute_bound, measured, work.calls)

    def _seconds(self, op: str, flops: float, nbytes: float, size: int,
                 context: int | None) -> tuple[float, bool, bool]:
        """`op_time` of one call of `op` (see `OpWork` for the rest) as (seconds,
        compute-bound, measured), building no object."""
        group = OP_GROUP[op]
        if group == "comm":
            modeled, compute_bound = float(allreduce_seconds(nbytes, self.tp, self.gpu,
                                                             self.efficiency)), False
        else:
            roof = self.efficiency.group(group)
            compute_s = flops / (self.gpu.bf16_flops * roof.mfu)
            memory_s = nbytes / (self.gpu.hbm_bytes_per_s * roof.mbu)
            modeled = roof.latency_s + max(compute_s, memory_s)
            compute_bound = compute_s >= memory_s
        measured = None
        if self.profile is not None and context is not None:
            measured = self.profile.lookup(op, size, context)
        if measured is None:
            return modeled, compute_bound, False
        return measured, compute_bound, True

    def breakdown(self, batch: BatchShape) -> StepBreakdown:
        """Where the time of step `batch` goes; all zeros for an empty batch."""
        if batch.is_empty:
            return StepBreakdown()
        # The parts are sums in `step_ops` order; the dense calls come first and depend on
        # two row counts only, so their partial sums are memoised and attention added on.
        compute, memory, comm = self._dense_parts(batch.tokens, batch.logit_rows)
        for work in self._attention_ops(batch):
            seconds, compute_bound, _ = self._seconds(work.op, work.flops, work.bytes, work.size, work.context)
            if compute_bound:
                compute += seconds * work.calls
            else:
                memory += seconds * work.calls
        modeled = StepBreakdown(compute, memory, comm, self.efficiency.step_overhead_s)
        measured = self._measured_phase(batch)
        return modeled if measured is None else modeled.scaled(measured / modeled.total_s)

    def _dense_parts(self, tokens: int, logit_rows: int) -> tuple[float, float, float]:
        """(compute, memory, comm) seconds of the dense calls, summed in `step_ops` order."""
        key = (tokens, logit_rows)
        parts = self._dense_memo.get(key)
        if parts is None:
            compute = memory = comm = 0.0
            for op, size, calls in self._dense_calls(tokens, logit_rows):
                seconds, compute_bound, _ = self._seconds(op, *self._dense_work(op, size), size, 0)
                if op == "all_reduce":
                    comm += seconds * calls
                elif compute_bound:
                    compute += seconds * calls
                else:
                    memory += seconds * calls
            if len(self._dense_memo) >= _DENSE_MEMO_SIZE:
                self._dense_memo.clear()
            parts = self._dense_memo[key] = (compute, memory, comm)
        return parts

    def _measured_phase(self, batch: BatchShape) -> float | None:
        if self.profile is None:
            return None
        if batch.decode_seqs == 0:
            context = batch.prefill_equivalent_context()
            if context is None:
                return None
            return self.profile.lookup("prefill", batch.prefill_tokens, context)
        if batch.prefill_tokens == 0:
            return self.profile.lookup("decode", batch.decode_seqs,
                                       round(batch.decode_context_tokens / batch.decode_seqs))
        return None

    def step_time(self, batch: BatchShape) -> float:
        """Seconds of one engine step doing `batch`: > 0 for a non-empty batch (the fixed
        per-step overhead included), 0 for an empty one."""
        return self.breakdown(batch).total_s

    def prefill_time(self, tokens: int, context_tokens: int = 0) -> float:
        """Seconds of a step computing one prompt chunk of `tokens` new tokens after
        `context_tokens` already cached."""
        if tokens < 1 or context_tokens < 0:
            raise ValueError(f"prefill_time: tokens must be >= 1 and context_tokens >= 0, "
                             f"got {tokens}, {context_tokens}")
        return self.step_time(BatchShape.from_requests([(tokens, context_tokens)]))

    def decode_time(self, batch_size: int, context_tokens: int) -> float:
        """Seconds of a decode step of `batch_size` sequences reading `context_tokens` KV
        tokens in total over the batch."""
        if batch_size < 1 or context_tokens < batch_size:
            raise ValueError(f"decode_time: batch_size must be >= 1 and context_tokens >= "
                             f"batch_size, got {batch_size}, {context_tokens}")
        return self.step_time(BatchShape(decode_seqs=batch_size,
                                         decode_context_tokens=context_tokens))

    # -- capacity --------------------------------------------------------------------

    def kv_capacity_tokens(self, memory_fraction: float = 0.9) -> int:
        """KV tokens that fit beside the weights when `memory_fraction` of each of the
        `tp` GPUs' memory is given to the engine; 0 when the weights alone do not fit."""
        if not 0 < memory_fraction <= 1:
            raise ValueError(f"memory_fraction must lie in (0, 1], got {memory_fraction}")
        free = memory_fraction * self.gpu.memory_bytes - self.model.weight_bytes_per_gpu(self.tp)
        return max(0, int(free // self.model.kv_bytes_per_token_per_gpu(self.tp)))

    def prefill_tokens_per_s(self, tokens: int = 2048) -> float:
        """Prompt tokens per second of one long prefill of `tokens` tokens."""
        return tokens / self.prefill_time(tokens)

    def max_decode_tokens_per_s(self, context_tokens_per_seq: int = 1024,
                                max_seqs: int = 256) -> float:
        """Output tokens per second at the largest batch (at most `max_seqs`) whose
        sequences of `context_tokens_per_seq` tokens fit in the KV cache; 0.0 when not
        even one fits."""
        if context_tokens_per_seq < 1 or max_seqs < 1:
            raise ValueError("context_tokens_per_seq and max_seqs must be >= 1")
        seqs = min(max_seqs, self.kv_capacity_tokens() // context_tokens_per_seq)
        if seqs == 0:
            return 0.0
        return seqs / self.decode_time(seqs, seqs * context_tokens_per_seq)
