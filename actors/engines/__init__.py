"""Engines behind one protocol (`base.Engine`): `vllm` and `sim`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from actors.engines.base import Engine

if TYPE_CHECKING:
    from actors.replica_spec import ReplicaSpec

ENGINES = ("vllm", "sim")


def make_engine(spec: ReplicaSpec) -> Engine:
    """Build (not start) the engine a replica spec names. vLLM is imported only when used."""
    if spec.engine == "sim":
        from actors.engines.sim import SimEngine
        from actors.tokenizers import load_tokenizer

        return SimEngine(
            spec.model,
            spec.gpu_type,
            spec.arch,
            block_size=spec.block_size,
            max_model_len=spec.max_model_len,
            max_waiting=spec.max_queue,
            tokenizer=load_tokenizer(spec.tokenizer),
            **spec.engine_args,
        )
    if spec.engine == "vllm":
        from actors.engines.vllm_engine import VllmEngine

        if spec.model_path is None:
            raise ValueError(f"replica {spec.replica_id}: the vllm engine needs a model_path")
        args = dict(spec.engine_args)
        return VllmEngine(
            spec.model,
            spec.model_path,
            max_model_len=spec.max_model_len,
            block_size=spec.block_size,
            max_waiting=spec.max_queue,
            max_num_seqs=args.pop("max_num_seqs", 64),
            engine_args=args,
        )
    raise ValueError(f"replica {spec.replica_id}: unknown engine {spec.engine!r} (known: {ENGINES})")
