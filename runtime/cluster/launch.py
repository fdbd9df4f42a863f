"""`arborlm serve --replicas N`: start (or join, --ray-address) Ray, run the application of app.py
on --host:--port, serve until SIGTERM / Ctrl-C, then shut Serve down."""

from __future__ import annotations

import logging
import math
import os
import signal
import threading

logger = logging.getLogger("arborlm.cluster")

# Ray Serve's "throughput optimized" settings (RAY_SERVE_THROUGHPUT_OPTIMIZED), less direct
# ingress (direct_ingress_env sets it up on our port): user code and the router on the replica's
# own event loop, gRPC between Serve's actors, buffered request logs, GC frozen after start-up.
# Measured on 2 cores (docs/benchmarks.md): 1.22x requests/s on one document, 1.14x on eight. An
# environment that sets any of them wins; a cluster joined with --ray-address takes them from its nodes.
SERVE_THROUGHPUT_ENV = {
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
    "RAY_SERVE_LOG_TO_STDERR": "0",
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000",
    "RAY_SERVE_FREEZE_GC_ON_STARTUP": "1",
}


def direct_ingress_env(port: int) -> dict[str, str]:
    """Serve's direct ingress, on the cluster's own port: the ingress replica serves HTTP itself,
    so a request skips the proxy actor (its hop, and the ingress's call back to it for the body).
    The port range is that one port; the proxy Serve still starts goes to a spare port. A port freed
    by a dead ingress is reusable at once (no quarantine), and an ingress drains for 1 s, not 30."""
    return {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
            "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 1),  # range(min, max): one port
            "RAY_SERVE_PORT_QUARANTINE_S": "0",
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"}


def serve_cluster(args) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s [cluster] %(levelname)s %(message)s")
    # a joined cluster's nodes have their own Serve settings; RAY_SERVE_ENABLE_DIRECT_INGRESS=0 keeps the proxy
    direct = not args.ray_address and os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS", "1") == "1"
    env = {**SERVE_THROUGHPUT_ENV, **(direct_ingress_env(args.port) if direct else {})}
    for k, v in env.items():  # before Ray is imported (Serve reads them at import); the local Ray's processes inherit them
        os.environ.setdefault(k, v)
    try:
        import ray
        from ray import serve
    except ImportError:
        logger.error("--replicas needs Ray Serve: pip install 'arborlm[cluster]'")
        return 2
    from arborlm.runtime.cluster.app import build_app, free_port
    from arborlm.runtime.model import loader

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
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
        serve.start(http_options={"host": args.host, "port": free_port() if direct else args.port})
        serve.run(build_app(args), name="arborlm", route_prefix="/", blocking=False)
        logger.info("serving %d replicas on http://%s:%d (router: %s)", args.replicas, args.host, args.port, args.router)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
