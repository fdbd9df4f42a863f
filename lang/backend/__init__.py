"""Backends, and the default one programs run on when `run(backend=...)` is not given."""

from __future__ import annotations

import weakref

from arborlm.lang.backend.base import Backend, BackendError, GenerateCall, ModelInfo

_default: Backend | None = None
# id(engine) -> its EngineBackend, while that is in use. Not keyed by the engine in a WeakKeyDictionary:
# the backend holds its engine, so a strong value would keep every such engine alive. A live backend
# keeps its engine alive, so the id cannot be reused while its entry stands.
_engine_backends: weakref.WeakValueDictionary[int, Backend] = weakref.WeakValueDictionary()


def as_backend(obj) -> Backend:
    """A Backend as is; an arborlm Engine wrapped in an EngineBackend (one per engine)."""
    if isinstance(obj, Backend):
        return obj
    from arborlm.runtime import Engine

    if isinstance(obj, Engine):
        from arborlm.lang.backend.engine import EngineBackend

        backend = _engine_backends.get(id(obj))
        if backend is None:
            backend = _engine_backends[id(obj)] = EngineBackend(obj)
        return backend
    raise TypeError(f"not a backend: {obj!r}")


def set_default_backend(backend) -> None:
    global _default
    _default = as_backend(backend)


def resolve(backend=None) -> Backend:
    if backend is not None:
        return as_backend(backend)
    if _default is None:
        raise RuntimeError("no backend: pass backend=... or call set_default_backend(...)")
    return _default


__all__ = ["Backend", "BackendError", "GenerateCall", "ModelInfo", "as_backend", "set_default_backend", "resolve"]
