"""The HTTP process: FastAPI routes over the tokenizer manager, and the launcher that starts the
scheduler and detokenizer processes, serves until SIGTERM / Ctrl-C, and stops them."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hmac
import json
import logging
import multiprocessing as mp
import shutil
import sys

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from arborlm.runtime.constrained.validate import document_check
from arborlm.runtime.errors import ArborError, BadRequestError, UnsupportedError
from arborlm.runtime.sampling.params import SamplingParams
from arborlm.runtime.server import io_struct as io
from arborlm.runtime.server import native_api, openai_api
from arborlm.runtime.server.args import ServerArgs
from arborlm.runtime.server.errors import error_body, error_response, validation_message
from arborlm.runtime.server.procutil import Endpoints
from arborlm.runtime.server.tokenizer_manager import RequestFailed, TokenizerManager
from arborlm.runtime.tool_calls import pick_format

logger = logging.getLogger("arborlm.server")

DISCONNECT_POLL_S = 0.5
HEALTH_PROMPT = [1]


def _json(obj) -> bytes:
    return orjson.dumps(obj)


def sse(obj) -> bytes:
    return b"data: " + _json(obj) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


class Gate:
    """ASGI middleware in front of every route: the API key (all but /health), then the body size
    (the whole body is read up front; past the limit the answer is 413). Plain ASGI rather than
    Starlette's BaseHTTPMiddleware, which gets in the way of streaming and of disconnect checks."""

    def __init__(self, app, limit: int, api_key: str | None):
        self.app, self.limit, self.api_key = app, limit, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.api_key and scope["path"] != "/health":
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):
                return await self._reply(send, 401, "invalid or missing API key (Authorization: Bearer <key>)",
                                         "invalid_api_key")
        if int(headers.get(b"content-length", b"0") or 0) > self.limit:
            return await self._reject(send)
        chunks, size, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            more = msg.get("more_body", False)
            if size > self.limit:
                return await self._reject(send)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, send):
        await self._reply(send, 413, f"request body exceeds {self.limit} bytes", "request_too_large")

    @staticmethod
    async def _reply(send, status: int, message: str, code: str):
        payload = _json(error_body(status, message, code=code))
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})


async def parse_body(request: Request, model):
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
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


def create_app(args: ServerArgs, tm: TokenizerManager, model_name: str) -> FastAPI:
    app = FastAPI(title="arborlm", docs_url=None, redoc_url=None)

    # ---- errors ----------------------------------------------------------------------------
    @app.exception_handler(ValidationError)
    async def _pydantic(_, exc: ValidationError):
        msg, param = validation_message(exc)
        return error_response(400, msg, param)

    @app.exception_handler(RequestValidationError)
    async def _fastapi_validation(_, exc: RequestValidationError):
        msg, param = validation_message(exc)
        return error_response(400, msg, param)

    @app.exception_handler(ArborError)
    async def _arbor(_, exc: ArborError):
        status = 400 if isinstance(exc, (BadRequestError, UnsupportedError)) else 500
        return error_response(status, str(exc), _param_of(str(exc)))

    @app.exception_handler(BadRequestError)
    async def _bad(_, exc: BadRequestError):
        return error_response(400, str(exc), _param_of(str(exc)))

    @app.exception_handler(RequestFailed)
    async def _failed(_, exc: RequestFailed):
        return error_response(exc.status, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _internal(_, exc: Exception):
        logger.exception("unhandled error")
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")

    # ---- service -----------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if tm.dead:
            return error_response(503, tm.dead)
        return Response(status_code=200)

    @app.get("/health_generate")
    async def health_generate():
        params = SamplingParams.from_dict({"max_new_tokens": 1, "temperature": 0})
        await asyncio.wait_for(tm.generate_final(HEALTH_PROMPT, params), timeout=60)
        return Response(status_code=200)

    @app.get("/get_model_info")
    @app.get("/model_info")  # SGLang's newer name, which routers probe
    async def model_info():
        tok = tm.tokenizer  # the chat template and special tokens let a remote DSL render roles itself
        return {"model_path": tm.info.model_dir, "tokenizer_path": tm.info.tokenizer_dir, "is_generation": True,
                "served_model_name": model_name, "chat_template": tok.chat_template,
                "bos_token": tok.bos_token, "eos_token": tok.eos_token}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        req = await parse_body(request, native_api.TokenizeRequest)
        if isinstance(req.text, str):
            return {"input_ids": tm.encode(req.text)}
        return {"input_ids": [tm.encode(t) for t in req.text]}

    @app.get("/get_server_info")
    @app.get("/server_info")
    async def server_info():
        stats = await tm.ask(io.StatsReq)
        info = {k: v for k, v in dataclasses.asdict(args).items() if k != "api_key"}
        return {**info, "context_length": tm.context_length, "scheduler": stats}

    @app.post("/flush_cache")
    @app.get("/flush_cache")  # SGLang takes both
    async def flush_cache():
        ok = await tm.ask(io.FlushCacheReq)
        if not ok:
            return error_response(400, "cannot flush the cache while requests are running")
        return {"success": True}

    @app.post("/concate_and_append_request")
    async def concate_and_append(request: Request):
        """SGLang's client calls this after a fork join(mode="concate_and_append"), having already
        joined the forks' text itself; it names client-side ids the server never saw, so there is
        nothing to do (SGLang's own server has no such route and answers 404, failing the program)."""
        await request.body()
        return {"success": True}

    @app.post("/abort_request")
    async def abort_request(request: Request):
        req = await parse_body(request, AbortRequest)
        tm.abort(req.rid)
        return {"success": True}

    @app.get("/metrics")
    async def metrics():
        tm.metrics.observe_stats(await tm.ask(io.StatsReq))
        return Response(tm.metrics.render(), media_type="text/plain; version=0.0.4")

    # ---- native ------------------------------------------------------------------------------
    @app.post("/generate")
    async def generate(request: Request):
        req = await parse_body(request, native_api.GenerateRequest)
        subs, single = native_api.expand(req, tm)
        with_text = req.return_text_in_logprobs
        if req.stream:
            return StreamingResponse(_native_stream(subs, with_text, single), media_type="text/event-stream")
        out = await until_disconnected(request, native_api.run_all(tm, subs, with_text))
        if isinstance(out, Response):
            return out
        return Response(_json(out[0] if single else out), media_type="application/json")

    async def _native_stream(subs, with_text, single):
        try:
            sent: dict = {}
            async for sub, st in native_api.stream_all(subs, tm):
                chunk = native_api.stream_chunk(tm, st, sub, with_text, sent)
                if not single:
                    chunk["index"] = sub.index
                yield sse(chunk)
        except (RequestFailed, ArborError) as e:
            yield sse(error_body(getattr(e, "status", 400), str(e)))
        yield SSE_DONE

    # ---- OpenAI --------------------------------------------------------------------------------
    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "arborlm", "max_model_len": tm.context_length}]}

    def check_model(name: str) -> None:
        if name not in (model_name, args.model_path, "default"):
            raise RequestFailed(f"model {name!r} does not exist; this server serves {model_name!r}", 404)

    async def _openai(request: Request, model, make_subs, id_prefix: str, stream, respond):
        """The shared body of the two OpenAI generation routes."""
        req = await parse_body(request, model)
        check_model(req.model)
        subs = make_subs(req, tm)
        rid, created = openai_api.new_id(id_prefix)
        if req.stream:
            return StreamingResponse(stream(req, subs, rid, created), media_type="text/event-stream")
        states = await until_disconnected(request, _final_states(subs))
        if isinstance(states, Response):
            return states
        return respond(req, tm, subs, states, rid, created, model_name)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _openai(request, openai_api.CompletionRequest, openai_api.completion_subs, "cmpl",
                             _completion_stream, openai_api.completion_response)

    async def _final_states(subs):
        return list(await asyncio.gather(*(tm.generate_final(s.ids, s.params, s.return_logprob, s.logprob_start_len,
                                                             s.top_logprobs_num) for s in subs)))

    async def _completion_stream(req, subs, rid, created):
        sent: dict[int, int] = {}
        finals = {}
        try:
            if req.echo:
                for s in subs:
                    yield sse(openai_api.completion_chunk(rid, created, model_name, s.index, tm.tokenizer.decode(s.ids)))
            async for sub, st in native_api.stream_all(subs, tm):
                delta = st.text[sent.get(sub.index, 0):]
                sent[sub.index] = len(st.text)
                reason = openai_api.finish_reason(st) if st.finished else None
                if delta or reason:
                    yield sse(openai_api.completion_chunk(rid, created, model_name, sub.index, delta, reason,
                                                          document_check(sub.params, st.text, st.finished)))
                if st.finished:
                    finals[sub.index] = st
            if req.stream_options and req.stream_options.include_usage:
                states = [finals[s.index] for s in subs]
                firsts = [finals[s.index] for s in subs if s.index % req.n == 0]
                yield sse({"id": rid, "object": "text_completion", "created": created, "model": model_name,
                           "choices": [], "usage": openai_api.usage(states, firsts)})
        except (RequestFailed, ArborError) as e:
            yield sse(error_body(getattr(e, "status", 400), str(e)))
        yield SSE_DONE

    tool_format = pick_format(args.tool_call_parser, tm.tokenizer.chat_template)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        subs = functools.partial(openai_api.chat_subs, tool_format=tool_format)
        return await _openai(request, openai_api.ChatCompletionRequest, subs, "chatcmpl",
                             _chat_stream, openai_api.chat_response)

    async def _chat_stream(req, subs, rid, created):
        sent: dict[int, list[int]] = {}
        finals = {}
        try:
            for s in subs:
                yield sse(openai_api.chat_chunk(rid, created, model_name, s.index, {"role": "assistant", "content": ""}))
            tool_streams: dict = {}
            async for sub, st in native_api.stream_all(subs, tm):
                n_text, n_lp = sent.get(sub.index, [0, 0])
                delta, reason = openai_api.chat_stream_delta(req, tool_streams, sub, st, n_text)
                lps = None
                if req.logprobs and len(st.output_logprobs) > n_lp:
                    lps = openai_api.chat_logprobs(tm, st.output_logprobs[n_lp:], st.output_top_logprobs[n_lp:])
                sent[sub.index] = [len(st.text), len(st.output_logprobs)]
                if delta or reason or lps:
                    yield sse(openai_api.chat_chunk(rid, created, model_name, sub.index, delta, reason, lps,
                                                    openai_api.final_check(req, sub, st)))
                if st.finished:
                    finals[sub.index] = st
            if req.stream_options and req.stream_options.include_usage:
                states = [finals[s.index] for s in subs]
                yield sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                           "choices": [], "usage": openai_api.usage(states, states[:1])})
        except (RequestFailed, ArborError) as e:
            yield sse(error_body(getattr(e, "status", 400), str(e)))
        yield SSE_DONE

    return app


class AbortRequest(BaseModel):
    rid: str


def _param_of(message: str) -> str | None:
    head = message.split(":", 1)[0]
    return head if head and " " not in head else None


# ---- launching --------------------------------------------------------------------------------
def launch_server(args: ServerArgs) -> int:
    """Start the children, serve HTTP until stopped, stop the children. Returns the exit code."""
    import uvicorn

    from arborlm.runtime.model import loader
    from arborlm.runtime.server.detokenizer_process import run_detokenizer_process
    from arborlm.runtime.server.scheduler_process import run_scheduler_process

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s [http] %(levelname)s %(message)s")
    files = loader.resolve_model(args.model_path, args.tokenizer_path)  # converts the GGUF once, here
    endpoints = Endpoints.fresh()
    ctx = mp.get_context("spawn")
    sched_r, sched_w = ctx.Pipe(duplex=False)
    detok_r, detok_w = ctx.Pipe(duplex=False)
    procs = [
        ctx.Process(target=run_scheduler_process, args=(args.engine_args(), endpoints, sched_w, args.log_level,
                                                               args.stream_interval),
                    name="arborlm-scheduler", daemon=True),
        ctx.Process(target=run_detokenizer_process, args=(files.tokenizer_dir, endpoints, detok_w, args.log_level),
                    name="arborlm-detokenizer", daemon=True),
    ]
    for p in procs:
        p.start()
    try:
        info = _wait_ready(procs[0], sched_r)
        _wait_ready(procs[1], detok_r)
    except RuntimeError as e:
        logger.error("%s", e)
        _stop(procs, endpoints)
        return 1

    _Server = _server_class()

    async def serve() -> int:
        tm = TokenizerManager(info, endpoints)
        tm.start()
        app = create_app(args, tm, args.model_name(files.model_dir))
        config = uvicorn.Config(Gate(app, args.max_request_bytes, args.api_key), host=args.host, port=args.port,
                                log_level=args.log_level, timeout_graceful_shutdown=3, access_log=False)
        server = _Server(config)
        crashed: list[str] = []

        async def watch():
            while True:
                await asyncio.sleep(0.5)
                for p in procs:
                    if not p.is_alive():
                        reason = f"the {p.name} process exited unexpectedly (exit code {p.exitcode}); shutting down"
                        logger.error("%s", reason)
                        crashed.append(reason)
                        tm.fail_all(reason)
                        server.should_exit = True
                        return

        watcher = asyncio.ensure_future(watch())
        await server.serve()
        watcher.cancel()
        return 1 if crashed else 0

    try:
        import uvloop

        code = uvloop.run(serve())
    except ImportError:
        code = asyncio.run(serve())
    finally:
        _stop(procs, endpoints)
    return code


def _server_class():
    import contextlib
    import signal

    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn re-raises SIGTERM / SIGINT after its graceful shutdown, which would kill this
        process before it stops its children; here a signal just starts the shutdown."""

        @contextlib.contextmanager
        def capture_signals(self):
            loop = asyncio.get_running_loop()
            sigs = (signal.SIGINT, signal.SIGTERM)
            for sig in sigs:
                loop.add_signal_handler(sig, self.handle_exit, sig, None)
            try:
                yield
            finally:
                for sig in sigs:
                    loop.remove_signal_handler(sig)

    return Server


def _wait_ready(proc, conn):
    while not conn.poll(1.0):
        if not proc.is_alive():
            raise RuntimeError(f"the {proc.name} process died while starting (exit code {proc.exitcode})")
    kind, value = conn.recv()
    if kind != "ready":
        raise RuntimeError(f"the {proc.name} process failed to start: {value}")
    return value


def _stop(procs, endpoints: Endpoints) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)
    shutil.rmtree(endpoints.folder(), ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    sys.exit(launch_server(ServerArgs.from_cli(argv)))
