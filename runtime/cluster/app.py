"""The Ray Serve application of `arborlm serve --replicas N`: one ingress deployment (FastAPI, no
model) in front of N replica deployments, each running a whole `arborlm serve` child on loopback.

A replica proxies to its child, so the cluster speaks exactly the single server's APIs (native,
OpenAI, streaming, errors) with no second implementation of them. The ingress reads each request's
prompt as the routing key and calls the replicas' handle, whose router (routers.py) picks the
replica. Bodies come back as a stream of byte chunks, batched every BATCH_S so a stream is not one
Ray message per token. /health, /metrics, /flush_cache and /abort_request go to every replica.
"""


import json
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from arborlm.runtime.server.errors import error_body

logger = logging.getLogger("arborlm.cluster")

BATCH_S = 0.02  # a stream's bytes go back at most this often (the first chunk at once)
START_TIMEOUT_S = 900
PASS_HEADERS = ("content-type", "retry-after")
BROADCAST_TIMEOUT_S = 10
FAILED_MARK = "arborlm replica "  # "arborlm replica <id>: ..." in a replica's failure, for the retry


@dataclass
class Routed:
    """One HTTP request, as the ingress hands it to a replica; `key` is what the router reads."""

    key: str | None
    method: str
    path: str  # with the query string
    headers: list[tuple[str, str]]
    body: bytes
    avoid: str | None = None  # a retry: the replica that failed first


def routing_key(path: str, body: bytes) -> str | None:
    """The prompt text of a generation request (the first prompt of a batch), else None."""
    try:
        data = json.loads(body) if body else None
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    if path == "/v1/chat/completions":
        msgs = data.get("messages")
        if isinstance(msgs, list):
            return "\n".join(f"{m.get('role')}:{m.get('content') if isinstance(m.get('content'), str) else json.dumps(m.get('content'))}"
                             for m in msgs if isinstance(m, dict))
        return None
    value = data.get("prompt") if path == "/v1/completions" else data.get("text") or data.get("input_ids")
    while isinstance(value, list) and value and isinstance(value[0], (list, str)):
        value = value[0]  # a batch: route by its first prompt
    if isinstance(value, list):  # token ids
        return " ".join(str(t) for t in value)
    return value if isinstance(value, str) else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Replica:
    """One arborlm server (its own scheduler, KV pool and prefix cache) as a Serve replica."""

    def __init__(self, argv: list[str], api_key: str | None):
        self.id = serve.get_replica_context().replica_id.unique_id
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-P", "-m", "arborlm.runtime.launch_server", "--host", "127.0.0.1", "--port", str(port),
               "--exit-with-parent", *argv]
        # the child's settings are exactly argv: none of the cluster's ARBORLM_* variables (a
        # `replicas` among them would start a cluster per replica); the key travels out of `ps`
        env = {k: v for k, v in os.environ.items() if not k.upper().startswith("ARBORLM_")}
        if api_key:
            env["ARBORLM_API_KEY"] = api_key
        self.proc = subprocess.Popen(cmd, env=env)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"replica {self.id}: the arborlm server exited ({self.proc.returncode}) while starting")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"replica {self.id}: the arborlm server did not start in {START_TIMEOUT_S} s")
            time.sleep(0.5)
        self.client = httpx.AsyncClient(base_url=self.url, timeout=None,
                                        limits=httpx.Limits(max_connections=4096, max_keepalive_connections=64))

    async def forward(self, req: Routed):
        """First (status, headers, replica id), then the body in batched chunks. A server that
        cannot be reached fails naming this replica, so the ingress's retry goes elsewhere."""
        try:
            async with self.client.stream(req.method, req.path, headers=req.headers, content=req.body) as r:
                async for item in self._relay(r):
                    yield item
        except httpx.TransportError as e:
            raise RuntimeError(f"{FAILED_MARK}{self.id}: its arborlm server is unreachable ({type(e).__name__})") from None

    async def _relay(self, r: httpx.Response):
        yield r.status_code, [(k, v) for k, v in r.headers.items() if k.lower() in PASS_HEADERS], self.id
        buf, last = bytearray(), 0.0
        async for chunk in r.aiter_raw():
            buf += chunk
            now = time.monotonic()
            if now - last >= BATCH_S:
                yield bytes(buf)
                buf.clear()
                last = now
        if buf:
            yield bytes(buf)

    async def call(self, method: str, path: str, headers: list[tuple[str, str]], body: bytes = b"") -> tuple:
        """A whole small request (for the routes every replica answers): (replica, status, body)."""
        r = await self.client.request(method, path, headers=headers, content=body)
        return self.id, r.status_code, r.content

    def check_health(self) -> None:
        """Serve restarts a replica whose server died (and, with it, its KV and cache)."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"replica {self.id}: the arborlm server exited ({self.proc.returncode})")

    def __del__(self):
        proc = getattr(self, "proc", None)
        if proc is not None and proc.poll() is None:
            proc.terminate()


def _failed_replica(e: BaseException, before: str | None) -> str | None:
    """The replica a failure names (Replica.forward's message), if any."""
    text = str(e)
    i = text.find(FAILED_MARK)
    return text[i + len(FAILED_MARK):].split(":", 1)[0] if i >= 0 else before


def _sse_error(message: str) -> bytes:
    return b"data: " + json.dumps(error_body(503, message, code="unavailable")).encode() + b"\n\n"


def _headers(request: Request) -> list[tuple[str, str]]:
    return [(k, v) for k, v in request.headers.items() if k.lower() in ("authorization", "content-type", "accept")]


# The ingress class is pickled by value into its replica, with the module globals defined above
# it: its helpers must come before it.
fapp = FastAPI(title="arborlm cluster", docs_url=None, redoc_url=None)


@serve.ingress(fapp)
class Ingress:
    def __init__(self, replicas: DeploymentHandle):
        self.replicas = replicas

    async def _each(self, request: Request, path: str, body: bytes = b"") -> list:
        headers = _headers(request)
        resp = self.replicas.broadcast("call", request.method, path, headers, body)
        return await resp.results_async(timeout_s=BROADCAST_TIMEOUT_S, return_exceptions=True)

    @fapp.get("/health")
    async def health(self, request: Request):
        """200 while at least one replica serves; the body says how each is."""
        states = {}
        for r in await self._each(request, "/health"):
            if isinstance(r, BaseException):
                states[f"unreachable-{len(states)}"] = f"{type(r).__name__}"
            else:
                states[r[0]] = "ok" if r[1] == 200 else f"{r[1]}"
        ok = any(v == "ok" for v in states.values())
        return JSONResponse({"status": "ok" if ok else "unavailable", "replicas": states}, status_code=200 if ok else 503)

    @fapp.get("/metrics")
    async def metrics(self, request: Request):
        """Every replica's series, each with a `replica` label (HELP/TYPE lines once)."""
        families: dict[str, list[str]] = {}  # family -> its lines, HELP/TYPE once, samples of every replica
        family = ""
        for r in await self._each(request, "/metrics"):
            if isinstance(r, BaseException) or r[1] != 200:
                continue
            for line in r[2].decode().splitlines():
                if line.startswith("# "):
                    family = line.split()[2]
                    lines = families.setdefault(family, [])
                    if line not in lines:
                        lines.append(line)
                elif line:
                    name, _, rest = line.partition("{")
                    families.setdefault(family, []).append(
                        f'{name}{{replica="{r[0]}",{rest}' if rest else line.replace(" ", f'{{replica="{r[0]}"}} ', 1))
        text = "\n".join(line for lines in families.values() for line in lines)
        return Response(text + "\n", media_type="text/plain; version=0.0.4")

    @fapp.api_route("/flush_cache", methods=["GET", "POST"])
    @fapp.post("/abort_request")
    async def everywhere(self, request: Request):
        """Routes that concern every replica (an abort does not know where its request runs)."""
        results = await self._each(request, request.url.path, await request.body())
        codes = [r[1] for r in results if not isinstance(r, BaseException)]
        ok = bool(codes) and all(c == 200 for c in codes)
        body = {"success": ok, "replicas": len(codes)}
        return JSONResponse(body, status_code=200 if ok else (max(codes) if codes else 503))

    @fapp.api_route("/{path:path}", methods=["GET", "POST"])
    async def proxy(self, request: Request, path: str):
        body = await request.body()
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        routed = Routed(routing_key(request.url.path, body), request.method, target, _headers(request), body)
        for attempt in (1, 2):  # a replica that failed before answering: once more, another one first
            gen = self.replicas.options(stream=True).forward.remote(routed)
            try:
                status, headers, replica = await gen.__anext__()
                break
            except Exception as e:  # noqa: BLE001 - Ray's errors, or (over gRPC) the replica's own
                logger.warning("replica failed before answering (attempt %d): %s", attempt, e)
                routed.avoid = _failed_replica(e, routed.avoid)
                if attempt == 2:
                    return JSONResponse(error_body(503, f"no replica could serve the request: {type(e).__name__}",
                                                   code="unavailable"), status_code=503)

        events = any(k.lower() == "content-type" and v.startswith("text/event-stream") for k, v in headers)

        async def chunks():
            tail = b"\n\n"
            try:
                async for chunk in gen:
                    tail = chunk[-2:] or tail
                    yield chunk
            except Exception as e:  # noqa: BLE001 - the replica died mid-answer: the body ends short
                logger.warning("replica %s failed mid-answer: %s", replica, e)
                if events:  # as one server ends a failed stream: an error event, then [DONE]
                    msg = f"replica {replica} failed mid-stream; the answer is incomplete ({type(e).__name__})"
                    yield (b"" if tail == b"\n\n" else b"\n\n") + _sse_error(msg) + b"data: [DONE]\n\n"
            finally:  # a client that left: the replica stops (and its server aborts the request)
                gen.cancel()

        headers = dict(headers)
        headers["x-arborlm-replica"] = replica
        return StreamingResponse(chunks(), status_code=status, headers=headers)


def replica_argv(args) -> list[str]:
    """The flags of each replica's server: every setting that differs from its default, but for
    those of the cluster itself (address, port, replicas, routing)."""
    import dataclasses

    from arborlm.runtime.server.args import ServerArgs

    skip = {"host", "port", "replicas", "router", "router_imbalance", "router_imbalance_ratio", "ray_address", "replica_cpus",
            "restart_on_failure", "exit_with_parent", "api_key", "api_key_file", "cors_allow_origins"}
    argv = []
    for f in dataclasses.fields(ServerArgs):
        value = getattr(args, f.name)
        if f.name in skip or value == f.default:
            continue
        flag = "--" + f.name.replace("_", "-")
        argv += [flag if value else "--no-" + flag[2:]] if isinstance(value, bool) else [flag, str(value)]
    if args.num_threads is None:  # torch threads follow the CPUs Ray reserved for the replica
        argv += ["--num-threads", str(max(1, int(args.replica_cpus)))]
    return argv


def build_app(args):
    from ray.serve.config import RequestRouterConfig

    from arborlm.runtime.cluster.routers import ROUTER_CLASSES

    router = RequestRouterConfig(request_router_class=ROUTER_CLASSES[args.router],
                                 request_router_kwargs={"imbalance": args.router_imbalance, "ratio": args.router_imbalance_ratio}
                                 if args.router == "prefix" else {})
    replica = serve.deployment(Replica, name="Replica", num_replicas=args.replicas,
                               ray_actor_options={"num_cpus": args.replica_cpus},
                               max_ongoing_requests=100_000, request_router_config=router,
                               health_check_period_s=2, health_check_timeout_s=30)
    ingress = serve.deployment(Ingress, name="Ingress", ray_actor_options={"num_cpus": 0},
                               max_ongoing_requests=100_000)
    return ingress.bind(replica.bind(replica_argv(args), args.api_key))
