"""Backends, and the default one programs run on when `run(backend=...)` is not given."""

from __future__ import annotations

from arborlm.lang.backend.base import Backend, BackendError, GenerateCall, ModelInfo

_default: Backend | None = None


def as_backend(obj) -> Backend:
    """A Backend as is; an arborlm Engine wrapped in an EngineBackend (one per engine)."""
    if isinstance(obj, Backend):
        return obj
    from arborlm.runtime import Engine

    if isinstance(obj, Engine):
        from arborlm.lang.backend.engine import EngineBackend

        if not hasattr(obj, "_lang_backend"):
            obj._lang_backend = EngineBackend(obj)
        return obj._lang_backend
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
