"""The server process: starts the scheduler and detokenizer processes, serves HTTP until SIGTERM /
Ctrl-C or until a child dies, then stops the children and removes their sockets."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing as mp
import shutil
import signal
import sys

import uvicorn

from arborlm.runtime.server.app import create_app
from arborlm.runtime.server.args import ServerArgs
from arborlm.runtime.server.gate import Gate
from arborlm.runtime.server.procutil import Endpoints
from arborlm.runtime.server.tokenizer_manager import TokenizerManager

logger = logging.getLogger("arborlm.server")

WATCH_INTERVAL_S = 0.5


def main(argv: list[str] | None = None) -> None:
    sys.exit(launch_server(ServerArgs.from_cli(argv)))


def launch_server(args: ServerArgs) -> int:
    """Start the children, serve HTTP until stopped, stop the children. Returns the exit code."""
    # imported here: the scheduler process's imports (torch, the model) are only needed by a launch
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
    """Serve until a signal (exit code 0) or until a child dies (1)."""
    tm = TokenizerManager(info, endpoints)  # in the loop: its sockets and futures belong to it
    tm.start()
    app = Gate(create_app(args, tm, model_name), args.max_request_bytes, args.api_key)
    server = _Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                    timeout_graceful_shutdown=3, access_log=False))
    watcher = asyncio.ensure_future(_watch(procs, tm, server))
    await server.serve()
    crashed = watcher.done()  # the watcher returns only once a child has died
    watcher.cancel()
    return 1 if crashed else 0


async def _watch(procs, tm: TokenizerManager, server: uvicorn.Server) -> None:
    """Returns once a child has died, having failed every request and begun the shutdown."""
    while True:
        await asyncio.sleep(WATCH_INTERVAL_S)
        for p in procs:
            if not p.is_alive():
                reason = f"the {p.name} process exited unexpectedly (exit code {p.exitcode}); shutting down"
                logger.error("%s", reason)
                tm.fail_all(reason)
                server.should_exit = True
                return


class _Server(uvicorn.Server):
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
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)
    shutil.rmtree(endpoints.folder(), ignore_errors=True)
