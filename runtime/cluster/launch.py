"""`arborlm serve --replicas N`: start (or join, --ray-address) Ray, run the application of app.py
on --host:--port, serve until SIGTERM / Ctrl-C, then shut Serve down."""

from __future__ import annotations

import logging
import math
import os
import signal
import threading

logger = logging.getLogger("arborlm.cluster")


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
