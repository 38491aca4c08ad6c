"""The OpenAI-compatible ingress: a Ray Serve deployment serving `/v1/*` and `/health`.

Per request: validate the body at the edge (400 naming the field), tokenize, ask a
router agent for a replica, stream the replica's tokens back (SSE or one JSON body).
The ingress owns each accepted request's stream (`RequestStream`) until it ends.
No call per request goes to the controller.
"""

from __future__ import annotations

import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel
from ray import serve

from actors.engines.base import EngineError, GenerationRequest, SamplingSpec, TokenDelta
from actors.tokenizers import Tokenizer, load_tokenizer
from orchestrator import openai_protocol as oai
from orchestrator.admin.api import build_admin_app
from orchestrator.admin.audit import Audit
from orchestrator.admin.auth import TokenStore
from orchestrator.api_errors import (
    ApiError,
    bad_request,
    fleet_busy,
    unavailable,
)
from orchestrator.config import FleetConfig, ModelConfig, parse_config
from orchestrator.controller_client import ControllerClient, ControllerUnavailable
from orchestrator.dispatcher import Dispatcher, NoCapacity
from orchestrator.metrics import ObservationBuffer
from orchestrator.openai_protocol import parse_body
from orchestrator.request_log import FinishedRequest, RequestLog
from orchestrator.request_stream import RequestStream, StreamFailed
from orchestrator.response_format import ChatFormat, CompletionFormat, ResponseFormat, sse_event
from orchestrator.router_manager import agent_ids_of
from policies.block_hash import block_hashes
from policies.fleet_view import RoutingRequest
from policies.routing import Refusal

log = logging.getLogger(__name__)

api = FastAPI(title="Flotilla", description="OpenAI-compatible LLM serving across a mixed GPU fleet.")
admin = build_admin_app()
api.mount("/admin/v1", admin)


class _Outcome:
    COMPLETED = "completed"
    CLIENT_ABORTED = "client_aborted"
    REJECTED = "rejected"
    INVALID = "invalid"
    FAILED = "failed"


@serve.deployment(name="flotilla-ingress", max_ongoing_requests=1000)
@serve.ingress(api)
class OpenAIIngress:
    def __init__(self, config_data: dict[str, Any]):
        self.config: FleetConfig = parse_config(config_data)
        self.controller = ControllerClient.get_or_create(self.config)
        self.controller.start_soon()
        self.tokenizers: dict[str, Tokenizer] = {m.name: load_tokenizer(m.tokenizer_spec) for m in self.config.models}
        self.dispatcher = Dispatcher(self.config.namespace, agent_ids_of(self.config),
                                     self.config.server.admission_timeout_s)
        self.metrics = ObservationBuffer(self.controller.send_metrics)
        self.finished = RequestLog(self.controller.send_requests)  # the workload placement plans for
        self.started_at = int(time.time())
        admin.state.backend = self.controller
        admin.state.tokens = TokenStore.from_config(self.config.admin)
        admin.state.audit = Audit(lambda *labels: self.metrics.inc("flotilla_admin_mutations_total", labels))

    # routes -----------------------------------------------------------------------

    @api.get("/v1/models")
    async def list_models(self, request: Request) -> JSONResponse:
        try:
            self._authorize(request)
        except ApiError as e:
            return e.response()
        return JSONResponse(oai.models_list([m.name for m in self.config.models], self.started_at))

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._serve(request, oai.CompletionBody, CompletionFormat)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._serve(request, oai.ChatBody, ChatFormat)

    @api.get("/health")
    async def health(self) -> JSONResponse:
        try:
            status = await self.controller.status(timeout_s=2.0)
        except ControllerUnavailable as e:
            return JSONResponse({"status": "degraded", "controller": str(e)}, status_code=200)
        ready = {m.name: 0 for m in self.config.models}
        for r in status.replicas:
            if r.state == "ready":
                ready[r.model] = ready.get(r.model, 0) + 1
        healthy = all(n > 0 for n in ready.values())
        return JSONResponse({"status": "ok" if healthy else "unavailable", "ready_replicas": ready},
                            status_code=200 if healthy else 503)

    # one request ------------------------------------------------------------------

    async def _serve(self, request: Request, body_type: type[BaseModel], fmt: type[ResponseFormat]):
        self.metrics.start()
        self.finished.start()
        model_name, slo = "unknown", self.config.default_slo_class
        try:
            self._authorize(request)
            body = await parse_body(request, body_type)
            model = self._model(body.model)
            model_name = model.name  # only known names become label values
            slo = self._slo_class(body.slo_class)
            generation = self._generation_request(body, model, slo, fmt)
        except ApiError as e:
            self.metrics.inc("flotilla_requests_total", (model_name, slo, _Outcome.INVALID))
            return e.response()
        stream = RequestStream(
            generation, self._routing_request(generation, model), self.dispatcher,
            max_resumes=self.config.recovery.max_resumes,
            on_migrated=lambda move: self.metrics.observe(
                "flotilla_migration_downtime_seconds", (model.name,), move.downtime_s),
            on_recovered=lambda stall: self._recovered(model.name, stall),
        )
        self.metrics.inc("flotilla_requests_in_flight", (model.name,))
        self.metrics.inc("flotilla_prompt_tokens_total", (model.name,), len(generation.prompt_token_ids))
        deltas = stream.deltas()
        try:
            first = await anext(deltas)  # admission happens here: errors still get a status code
        except (NoCapacity, StreamFailed, EngineError) as e:
            self._finish(stream, _Outcome.REJECTED if isinstance(e, NoCapacity) else _Outcome.FAILED)
            return self._admission_error(e).response()
        except BaseException:
            self._finish(stream, _Outcome.CLIENT_ABORTED)
            raise
        formatter = fmt(generation.request_id, model.name)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = self._sse(stream, first, deltas, formatter, include_usage)
            return StreamingResponse(events, media_type="text/event-stream")
        return await self._collect(stream, first, deltas, formatter)

    async def _sse(self, stream: RequestStream, first: TokenDelta, rest: AsyncIterator[TokenDelta],
                   fmt: ResponseFormat, include_usage: bool) -> AsyncIterator[str]:
        outcome = _Outcome.CLIENT_ABORTED  # unless we reach the end
        try:
            for chunk in fmt.opening():
                yield sse_event(chunk)
            yield sse_event(fmt.chunk(first))
            async for delta in rest:
                yield sse_event(fmt.chunk(delta))
            if include_usage:
                yield sse_event(fmt.usage(self._usage(stream)))
            yield "data: [DONE]\n\n"
            outcome = _Outcome.COMPLETED
        except StreamFailed as e:
            outcome = _Outcome.FAILED
            yield sse_event(ApiError(500, str(e), type="server_error", code="stream_failed").body())
            yield "data: [DONE]\n\n"
        finally:
            await rest.aclose()
            self._finish(stream, outcome)

    async def _collect(self, stream: RequestStream, first: TokenDelta, rest: AsyncIterator[TokenDelta],
                       fmt: ResponseFormat) -> JSONResponse:
        texts = [first.text]
        outcome = _Outcome.CLIENT_ABORTED
        try:
            async for delta in rest:
                texts.append(delta.text)
            outcome = _Outcome.COMPLETED
        except StreamFailed as e:
            outcome = _Outcome.FAILED
            return ApiError(500, str(e), type="server_error", code="stream_failed").response()
        finally:
            await rest.aclose()
            self._finish(stream, outcome)
        return JSONResponse(fmt.whole("".join(texts), stream.finish_reason.value, self._usage(stream)))

    # pieces -----------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        keys = self.config.server.api_keys
        if not keys:
            return
        header = request.headers.get("authorization", "")
        given = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
        if not any(secrets.compare_digest(given.encode(), k.encode()) for k in keys):
            raise ApiError(401, "invalid or missing API key", code="invalid_api_key")

    def _model(self, name: str) -> ModelConfig:
        model = self.config.model(name)
        if model is None:
            known = ", ".join(m.name for m in self.config.models)
            raise bad_request(f"the model '{name}' does not exist (serving: {known})", "model", "model_not_found")
        return model

    def _slo_class(self, name: str | None) -> str:
        if name is None:
            return self.config.default_slo_class
        if not any(c.name == name for c in self.config.slo_classes):
            raise bad_request(f"unknown slo_class '{name}'", "slo_class")
        return name

    def _generation_request(self, body: Any, model: ModelConfig, slo: str,
                            fmt: type[ResponseFormat]) -> GenerationRequest:
        tokenizer = self.tokenizers[model.name]
        prompt_ids = fmt.prompt_ids(body, tokenizer)
        if not prompt_ids:
            raise bad_request("the prompt is empty", fmt.prompt_field)
        if any(not 0 <= t < tokenizer.vocab_size for t in prompt_ids):
            raise bad_request(f"prompt token ids must be in [0, {tokenizer.vocab_size})", fmt.prompt_field)
        room = model.max_model_len - len(prompt_ids)
        if room <= 0:
            raise bad_request(f"the prompt has {len(prompt_ids)} tokens; this model's maximum context length "
                              f"is {model.max_model_len}", fmt.prompt_field, "context_length_exceeded")
        max_tokens = fmt.max_tokens(body) or room
        if max_tokens > room:
            raise bad_request(f"max_tokens is too large: this model's maximum context length is "
                              f"{model.max_model_len} tokens and the prompt has {len(prompt_ids)}, so at most "
                              f"{room} can be generated; you asked for {max_tokens}", "max_tokens",
                              "context_length_exceeded")
        priority = body.priority if body.priority is not None else next(
            c.priority for c in self.config.slo_classes if c.name == slo)
        return GenerationRequest(
            request_id=f"{fmt.id_prefix}-{uuid.uuid4().hex}",
            model=model.name,
            prompt_token_ids=tuple(prompt_ids),
            sampling=SamplingSpec(max_tokens=max_tokens, temperature=float(body.temperature),
                                  top_p=float(body.top_p), seed=body.seed, stop=body.stop_strings,
                                  ignore_eos=body.ignore_eos),
            priority=priority,
            slo_class=slo,
        )

    def _routing_request(self, request: GenerationRequest, model: ModelConfig) -> RoutingRequest:
        return RoutingRequest(
            request_id=request.request_id,
            model=model.name,
            prompt_tokens=len(request.prompt_token_ids),
            max_tokens=request.sampling.max_tokens,
            block_hashes=block_hashes(request.prompt_token_ids, model.block_size, model.name),
            slo_class=request.slo_class,
        )

    def _admission_error(self, error: Exception) -> ApiError:
        retry = self.config.server.retry_after_s
        if isinstance(error, NoCapacity):
            if error.refusal is Refusal.FULL:
                return fleet_busy(retry, error.reason)
            if error.refusal is Refusal.TOO_LONG:
                return bad_request(f"no replica can hold this request: {error.reason}", "max_tokens",
                                   "context_length_exceeded")
            return unavailable(retry, error.reason)
        if isinstance(error, EngineError) and error.code == "bad_request":
            return bad_request(str(error))
        return ApiError(500, str(error), type="server_error", code="stream_failed")

    def _log_finished(self, stream: RequestStream, outcome: str) -> None:
        """One record for the placement's workload window. A refused request counts with the
        tokens it asked for: its demand is real, and counting only what the fleet carried
        would hide the capacity it lacks."""
        request = stream.request
        output = request.sampling.max_tokens if outcome == _Outcome.REJECTED else len(stream.output_ids)
        arrived = time.time() - (stream.clock() - stream.arrived_at)  # the stream's clock is monotonic
        self.finished.add(FinishedRequest(request.model, arrived, len(request.prompt_token_ids), output))

    def _usage(self, stream: RequestStream) -> dict[str, int]:
        return oai.usage_of(len(stream.request.prompt_token_ids), len(stream.output_ids))

    def _recovered(self, model: str, stall_s: float) -> None:
        self.metrics.inc("flotilla_recovered_requests_total", ("resumed",))
        self.metrics.observe("flotilla_recovery_seconds", (model,), stall_s)

    def _finish(self, stream: RequestStream, outcome: str) -> None:
        model, slo = stream.request.model, stream.request.slo_class
        self._log_finished(stream, outcome)
        m = self.metrics
        m.dec("flotilla_requests_in_flight", (model,))
        m.inc("flotilla_requests_total", (model, slo, outcome))
        m.inc("flotilla_output_tokens_total", (model,), len(stream.output_ids))
        if outcome == _Outcome.FAILED and stream.resumes:
            m.inc("flotilla_recovered_requests_total", ("failed",))
        if outcome != _Outcome.COMPLETED or stream.ttft_s is None:
            return
        m.observe("flotilla_ttft_seconds", (model, slo), stream.ttft_s)
        m.observe("flotilla_e2e_seconds", (model, slo), stream.last_token_at - stream.arrived_at)
        if stream.tpot_s is not None:
            m.observe("flotilla_tpot_seconds", (model, slo), stream.tpot_s)
        target = next(c for c in self.config.slo_classes if c.name == slo)
        if stream.ttft_s <= target.ttft_s and (stream.tpot_s or 0.0) <= target.tpot_s:
            m.inc("flotilla_requests_slo_met_total", (model, slo))
