"""The HTTP routes over the tokenizer manager, in three groups: the service routes (health, info,
tokenize, cache, abort, metrics), SGLang's native /generate, and the OpenAI API. Errors raised
anywhere in a route become JSON error bodies here, in one place."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator

import orjson
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from arborlm.runtime.errors import ArborError, BadRequestError, UnsupportedError
from arborlm.runtime.sampling.params import SamplingParams
from arborlm.runtime.server import io_struct as io
from arborlm.runtime.server import native_api, openai_api
from arborlm.runtime.server.args import ServerArgs
from arborlm.runtime.server.errors import error_body, error_response, validation_message
from arborlm.runtime.server.tokenizer_manager import Admission, RequestFailed, TokenizerManager
from arborlm.runtime.tool_calls import pick_format

logger = logging.getLogger("arborlm.server")

DISCONNECT_POLL_S = 0.5
HEALTH_PROMPT = [1]
SSE_DONE = b"data: [DONE]\n\n"


def create_app(args: ServerArgs, tm: TokenizerManager, model_name: str) -> FastAPI:
    app = FastAPI(title="arborlm", docs_url=None, redoc_url=None, exception_handlers=_ERROR_HANDLERS)
    app.include_router(service_routes(args, tm, model_name))
    app.include_router(native_routes(tm))
    app.include_router(openai_routes(args, tm, model_name))
    return app


# ---- errors ---------------------------------------------------------------------------------------
async def _invalid(_, exc: ValidationError | RequestValidationError):
    msg, param = validation_message(exc)
    return error_response(400, msg, param)


def status_of(exc: BaseException) -> int:
    if isinstance(exc, RequestFailed):
        return exc.status
    if isinstance(exc, (BadRequestError, UnsupportedError, ValidationError, RequestValidationError)):
        return 400
    return 500


async def _arbor(_, exc: ArborError):
    return error_response(status_of(exc), str(exc), _param_of(str(exc)))


async def _failed(_, exc: RequestFailed):
    code = {429: "queue_full", 503: "unavailable"}.get(exc.status)
    return error_response(exc.status, str(exc), code=code, headers=exc.headers)


async def _http(_, exc: StarletteHTTPException):
    return error_response(exc.status_code, str(exc.detail))


async def _internal(_, exc: Exception):
    logger.exception("unhandled error")
    return error_response(500, f"internal error: {type(exc).__name__}: {exc}")


_ERROR_HANDLERS = {ValidationError: _invalid, RequestValidationError: _invalid, ArborError: _arbor,
                   RequestFailed: _failed, StarletteHTTPException: _http, Exception: _internal}


def _param_of(message: str) -> str | None:
    """Our error messages start with the field at fault ("max_tokens: ..."); OpenAI's body names it."""
    head = message.split(":", 1)[0]
    return head if head and " " not in head else None


# ---- helpers --------------------------------------------------------------------------------------
def _json(obj) -> bytes:
    return orjson.dumps(obj)


def sse(obj) -> bytes:
    return b"data: " + _json(obj) + b"\n\n"


def event_stream(chunks: AsyncIterator[dict], adm: Admission) -> StreamingResponse:
    """Chunks as server-sent events; an error mid-stream becomes a last event, then [DONE]."""
    status = 200

    async def events():
        nonlocal status
        async with contextlib.aclosing(chunks):  # a client that goes away ends (aborts) the requests now
            try:
                async for chunk in chunks:
                    yield sse(chunk)
            except (RequestFailed, ArborError) as e:
                status = status_of(e)
                yield sse(error_body(status, str(e)))
        yield SSE_DONE

    return _Stream(events(), lambda: adm.close(status))


class _Stream(StreamingResponse):
    """A server-sent event stream whose admission is closed however the response ends, even when
    the client leaves before the body starts (then the generator above never runs)."""

    def __init__(self, body, on_close):
        super().__init__(body, media_type="text/event-stream")
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def admit(tm: TokenizerManager, request: Request, subs, route: str, priority: int | None,
          request_id: str | None) -> Admission:
    """Admit a request's sub-requests as one (429 when the queue is full, 503 while draining)."""
    client = f"{request.client.host}:{request.client.port}" if request.client else None
    adm = tm.admit(len(subs), route, client, priority)
    adm.id = request_id
    for sub in subs:
        sub.priority, sub.admission = priority, adm
    return adm


async def finish(adm: Admission, coro):
    """Await a non-streamed request's coroutine, closing its admission with the response status."""
    status = 500
    try:
        out = await coro
        status = out.status_code if isinstance(out, Response) else 200
        return out
    except Exception as e:
        status = status_of(e)
        raise
    finally:
        adm.close(status)


async def parse_body(request: Request, model):
    """orjson: strict JSON (no NaN / Infinity, no lone surrogates, bounded depth), never a crash."""
    raw = await request.body()
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise BadRequestError(f"the request body is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise BadRequestError("the request body must be a JSON object")
    return model.model_validate(data)


async def until_disconnected(request: Request, coro):
    """Run coro; cancel it (which aborts its requests) if the client goes away first."""
    task = asyncio.ensure_future(coro)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                return Response(status_code=499)
    finally:
        if not task.done():
            task.cancel()


class AbortRequest(BaseModel):
    rid: str


# ---- service --------------------------------------------------------------------------------------
def service_routes(args: ServerArgs, tm: TokenizerManager, model_name: str) -> APIRouter:
    router = APIRouter()

    @router.get("/health")
    async def health():
        if tm.dead:
            return error_response(503, tm.dead)
        if tm.draining:  # load balancers move away while the running requests finish
            return error_response(503, "the server is shutting down", code="unavailable")
        return Response(status_code=200)

    @router.get("/health_generate")
    async def health_generate():
        params = SamplingParams.from_dict({"max_new_tokens": 1, "temperature": 0})
        await asyncio.wait_for(tm.generate_final(HEALTH_PROMPT, params), timeout=60)
        return Response(status_code=200)

    @router.get("/get_model_info")
    @router.get("/model_info")  # SGLang's newer name, which routers probe
    async def model_info():
        tok = tm.tokenizer  # the chat template and special tokens let a remote DSL render roles itself
        return {"model_path": tm.info.model_dir, "tokenizer_path": tm.info.tokenizer_dir, "is_generation": True,
                "served_model_name": model_name, "chat_template": tok.chat_template,
                "bos_token": tok.bos_token, "eos_token": tok.eos_token}

    @router.post("/tokenize")
    async def tokenize(request: Request):
        req = await parse_body(request, native_api.TokenizeRequest)
        if isinstance(req.text, str):
            return {"input_ids": tm.encode(req.text)}
        return {"input_ids": [tm.encode(t) for t in req.text]}

    @router.get("/get_server_info")
    @router.get("/server_info")
    async def server_info():
        stats = await tm.ask(io.StatsReq)
        return {**args.public(), "context_length": tm.context_length, "scheduler": stats,
                "queued_requests": tm.queued(), "queue_limit": tm.queue_limit, "draining": tm.draining}

    @router.post("/flush_cache")
    @router.get("/flush_cache")  # SGLang takes both
    async def flush_cache():
        ok = await tm.ask(io.FlushCacheReq)
        if not ok:
            return error_response(400, "cannot flush the cache while requests are running")
        return {"success": True}

    @router.post("/concate_and_append_request")
    async def concate_and_append(request: Request):
        """SGLang's client calls this after a fork join(mode="concate_and_append"), having already
        joined the forks' text itself; it names client-side ids the server never saw, so there is
        nothing to do (SGLang's own server has no such route and answers 404, failing the program)."""
        await request.body()
        return {"success": True}

    @router.post("/abort_request")
    async def abort_request(request: Request):
        req = await parse_body(request, AbortRequest)
        tm.abort(req.rid)
        return {"success": True}

    @router.get("/metrics")
    async def metrics():
        tm.metrics.observe_stats(await tm.ask(io.StatsReq), tm.queued())
        return Response(tm.metrics.render(), media_type="text/plain; version=0.0.4")

    return router


# ---- native ---------------------------------------------------------------------------------------
def native_routes(tm: TokenizerManager) -> APIRouter:
    router = APIRouter()

    @router.post("/generate")
    async def generate(request: Request):
        req = await parse_body(request, native_api.GenerateRequest)
        subs, single = native_api.expand(req, tm)
        adm = admit(tm, request, subs, "/generate", req.priority, subs[0].rid if subs else None)
        with_text = req.return_text_in_logprobs
        if req.stream:
            return event_stream(_native_chunks(tm, subs, with_text, single), adm)
        out = await finish(adm, until_disconnected(request, native_api.run_all(tm, subs, with_text)))
        if isinstance(out, Response):
            return out
        return Response(_json(out[0] if single else out), media_type="application/json")

    return router


async def _native_chunks(tm: TokenizerManager, subs, with_text: bool, single: bool) -> AsyncIterator[dict]:
    sent: dict = {}
    async for sub, st in native_api.stream_all(subs, tm):
        chunk = native_api.stream_chunk(tm, st, sub, with_text, sent)
        if not single:
            chunk["index"] = sub.index
        yield chunk


# ---- OpenAI ---------------------------------------------------------------------------------------
def openai_routes(args: ServerArgs, tm: TokenizerManager, model_name: str) -> APIRouter:
    router = APIRouter()
    served = (model_name, args.model_path, "default")
    chat_subs = functools.partial(openai_api.chat_subs,
                                  tool_format=pick_format(args.tool_call_parser, tm.tokenizer.chat_template))

    async def generate(request: Request, model, make_subs, id_prefix: str, chunks: openai_api.ChunkFormat, respond):
        """The shared body of the two generation routes."""
        req = await parse_body(request, model)
        if req.model not in served:
            raise RequestFailed(f"model {req.model!r} does not exist; this server serves {model_name!r}", 404)
        subs = make_subs(req, tm)
        rid, created = openai_api.new_id(id_prefix)
        adm = admit(tm, request, subs, request.url.path, req.priority, rid)
        if req.stream:
            return event_stream(openai_api.stream_chunks(chunks, req, tm, subs, rid, created, model_name), adm)
        states = await finish(adm, until_disconnected(request, openai_api.final_states(tm, subs)))
        if isinstance(states, Response):
            return states
        return respond(req, tm, subs, states, rid, created, model_name)

    @router.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "arborlm", "max_model_len": tm.context_length}]}

    @router.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, openai_api.CompletionRequest, openai_api.completion_subs, "cmpl",
                              openai_api.COMPLETION_CHUNKS, openai_api.completion_response)

    @router.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, openai_api.ChatCompletionRequest, chat_subs, "chatcmpl",
                              openai_api.CHAT_CHUNKS, openai_api.chat_response)

    return router
