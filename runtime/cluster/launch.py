"""`arborlm serve --replicas N`: start (or join, --ray-address) Ray, run the application of app.py
on --host:--port, serve until SIGTERM / Ctrl-C, then shut Serve down."""

from __future__ import annotations

import logging
import math
import os
import signal
import threading

logger = logging.getLogger("arborlm.cluster")

# Ray Serve's "throughput optimized" settings (RAY_SERVE_THROUGHPUT_OPTIMIZED) but for direct
# ingress, which would move the HTTP port: user code and the router on the replica's own event
# loop, gRPC between Serve's actors, buffered request logs, GC frozen after start-up. Measured on
# 2 cores (docs/benchmarks.md): 1.22x requests/s on one document, 1.14x on eight. An environment
# that sets any of them wins; a cluster joined with --ray-address takes them from its nodes.
SERVE_THROUGHPUT_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
    "RAY_SERVE_LOG_TO_STDERR": "0",
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000",
    "RAY_SERVE_FREEZE_GC_ON_STARTUP": "1",
}


def serve_cluster(args) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s [cluster] %(levelname)s %(message)s")
    try:
        import ray
        from ray import serve
    except ImportError:
        logger.error("--replicas needs Ray Serve: pip install 'arborlm[cluster]'")
        return 2
    from arborlm.runtime.cluster.app import build_app
    from arborlm.runtime.model import loader

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    for k, v in SERVE_THROUGHPUT_ENV.items():  # the local Ray's processes inherit these
        os.environ.setdefault(k, v)
    loader.resolve_model(args.model_path, args.tokenizer_path)  # convert the GGUF once, before the replicas read it
    if args.ray_address:
        ray.init(address=args.ray_address, include_dashboard=False, logging_level=logging.WARNING)
    else:  # logical CPUs: every replica's share, however few cores this machine has
        need = math.ceil(args.replicas * args.replica_cpus)
        ray.init(num_cpus=max(os.cpu_count() or 1, need), include_dashboard=False, logging_level=logging.WARNING)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(build_app(args), name="arborlm", route_prefix="/", blocking=False)
        logger.info("serving %d replicas on http://%s:%d (router: %s)", args.replicas, args.host, args.port, args.router)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
