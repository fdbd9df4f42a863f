"""Kept so that older imports keep working: the HTTP server is now `app` (routes), `gate` (the
ASGI gate) and `launch` (the process launcher)."""

from arborlm.runtime.server.app import create_app, sse
from arborlm.runtime.server.gate import Gate
from arborlm.runtime.server.launch import launch_server, main

__all__ = ["Gate", "create_app", "launch_server", "main", "sse"]
