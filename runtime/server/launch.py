"""The server process: starts the scheduler and detokenizer processes, serves HTTP until SIGTERM /
Ctrl-C or until a child dies, then stops the children and removes their sockets.

SIGTERM drains: new requests get 503 (and /health too, so load balancers move away), running ones
get --shutdown-timeout seconds to finish, the rest are aborted (answered with what they have), and
the process exits 0. A second signal stops at once. A dead child exits non-zero, or with
--restart-on-failure starts the whole server again."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing as mp
import os
import shutil
import signal
import sys
import time

import uvicorn

from arborlm.runtime.server.app import create_app
from arborlm.runtime.server.args import ServerArgs
from arborlm.runtime.server.gate import Gate
from arborlm.runtime.server.procutil import Endpoints, parent_signals_blocked
from arborlm.runtime.server.tokenizer_manager import TokenizerManager

logger = logging.getLogger("arborlm.server")

WATCH_INTERVAL_S = 0.5
CRASHED = 1  # the exit code when a child died (startup failures are 2: no restart helps them)


RESTART_BACKOFF_S = (1, 2, 5, 10, 30)
DRAIN_POLL_S = 0.1
ABORT_GRACE_S = 5.0  # after aborting, how long the last answers get to go out


def main(argv: list[str] | None = None) -> None:
    args = ServerArgs.from_cli(argv)
    if args.replicas > 1:  # Ray is imported only here: the single-server path never needs it
        from arborlm.runtime.cluster.launch import serve_cluster

        sys.exit(serve_cluster(args))
    restarts = 0
    while True:
        started = time.monotonic()
        code = launch_server(args)
        if code != CRASHED or not args.restart_on_failure:
            sys.exit(code)
        if time.monotonic() - started > 600:  # it ran a while: a fresh failure, not a crash loop
            restarts = 0
        wait = RESTART_BACKOFF_S[min(restarts, len(RESTART_BACKOFF_S) - 1)]
        restarts += 1
        logger.error("restarting the server in %d s (--restart-on-failure; restart %d)", wait, restarts)
        time.sleep(wait)


def launch_server(args: ServerArgs) -> int:
    """Start the children, serve HTTP until stopped, stop the children. Returns the exit code."""
    # imported here: the scheduler process's imports (torch, the model) are only needed by a launch
    from arborlm.runtime.model import loader
    from arborlm.runtime.server.detokenizer_process import run_detokenizer_process
    from arborlm.runtime.server.scheduler_process import run_scheduler_process

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s [http] %(levelname)s %(message)s")
    if args.log_requests:  # its lines show whatever the log level
        logging.getLogger("arborlm.requests").setLevel(logging.INFO)
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
    with parent_signals_blocked():
        for p in procs:
            p.start()
    try:
        info = _wait_ready(procs[0], sched_r)
        _wait_ready(procs[1], detok_r)
    except RuntimeError as e:
        logger.error("%s", e)
        _stop(procs, endpoints)
        return 2

    serving = _serve(args, info, endpoints, args.model_name(files.model_dir), procs)
    try:
        import uvloop

        code = uvloop.run(serving)
    except ImportError:
        code = asyncio.run(serving)
    finally:
        _stop(procs, endpoints)
    return code


async def _serve(args: ServerArgs, info, endpoints: Endpoints, model_name: str, procs) -> int:
    """Serve until a signal (exit code 0) or until a child dies (CRASHED)."""
    tm = TokenizerManager(info, endpoints, model_name, args.queued_limit(info.pool_size), args.request_timeout,
                          args.log_requests, args.log_requests_text)  # in the loop: its sockets belong to it
    tm.start()
    app = Gate(create_app(args, tm, model_name), args.max_request_bytes, args.api_key)
    if args.cors_origins():  # outermost: a preflight carries no API key
        from starlette.middleware.cors import CORSMiddleware

        app = CORSMiddleware(app, allow_origins=args.cors_origins(), allow_methods=["*"], allow_headers=["*"])
    server = _Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                    timeout_graceful_shutdown=ABORT_GRACE_S, access_log=args.access_log))
    server.drain = lambda: _drain(tm, server, args.shutdown_timeout)
    watcher = asyncio.ensure_future(_watch(procs, tm, server, os.getppid() if args.exit_with_parent else None))
    await server.serve()
    crashed = watcher.done()  # the watcher returns only once a child has died
    watcher.cancel()
    return CRASHED if crashed else 0


async def _drain(tm: TokenizerManager, server: uvicorn.Server, timeout: float) -> None:
    """Refuse new requests, let the running ones finish for up to `timeout` s, abort the rest,
    give their last answers a moment to go out, then stop serving."""
    tm.draining = True
    logger.info("draining: %d requests in flight, up to %g s", len(tm.states), timeout)
    deadline = time.monotonic() + timeout
    while (tm.states or tm.reserved) and time.monotonic() < deadline:  # reserved: admitted, not yet sent
        await asyncio.sleep(DRAIN_POLL_S)
    if tm.states:
        logger.warning("shutdown timeout: aborting %d requests", len(tm.states))
        for rid in list(tm.states):
            tm.abort(rid)
        deadline = time.monotonic() + ABORT_GRACE_S
        while tm.states and time.monotonic() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
    server.should_exit = True


async def _watch(procs, tm: TokenizerManager, server: "_Server", ppid: int | None) -> None:
    """Returns once a child has died, having failed every request and begun the shutdown. With
    --exit-with-parent, a parent that went away starts the drain, as SIGTERM would."""
    while True:
        await asyncio.sleep(WATCH_INTERVAL_S)
        if ppid is not None and os.getppid() != ppid and server.draining is None:
            logger.warning("the parent process exited: shutting down (--exit-with-parent)")
            server.on_signal(signal.SIGTERM)
        for p in procs:
            if not p.is_alive():
                reason = f"the {p.name} process exited unexpectedly (exit code {p.exitcode}); shutting down"
                logger.error("%s", reason)
                tm.fail_all(reason)
                server.should_exit = True
                return


class _Server(uvicorn.Server):
    """uvicorn re-raises SIGTERM / SIGINT after its graceful shutdown, which would kill this
    process before it stops its children; here the first signal starts the drain, a second one
    the shutdown."""

    drain = None
    draining: asyncio.Task | None = None

    def on_signal(self, sig) -> None:
        if self.draining is None and self.drain is not None:
            self.draining = asyncio.ensure_future(self.drain())
        else:
            self.handle_exit(sig, None)

    @contextlib.contextmanager
    def capture_signals(self):
        loop = asyncio.get_running_loop()
        sigs = (signal.SIGINT, signal.SIGTERM)
        for sig in sigs:
            loop.add_signal_handler(sig, self.on_signal, sig)
        try:
            yield
        finally:
            for sig in sigs:
                loop.remove_signal_handler(sig)


def _wait_ready(proc, conn):
    """The child's ready message (the scheduler's carries the model info); raises if it fails."""
    while not conn.poll(1.0):
        if not proc.is_alive():
            raise RuntimeError(f"the {proc.name} process died while starting (exit code {proc.exitcode})")
    kind, value = conn.recv()
    if kind != "ready":
        raise RuntimeError(f"the {proc.name} process failed to start: {value}")
    return value


def _stop(procs, endpoints: Endpoints) -> None:
    """SIGKILL: the children ignore SIGTERM (procutil), and by now every answer has gone out."""
    for p in procs:
        if p.is_alive():
            p.kill()
    for p in procs:
        p.join(timeout=5)
    shutil.rmtree(endpoints.folder(), ignore_errors=True)
