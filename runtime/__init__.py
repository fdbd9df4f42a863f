"""arborlm.runtime: the serving engine (paged KV pool, continuous batching, sampling)."""

from arborlm.runtime.config import EngineArgs
from arborlm.runtime.engine import Engine
from arborlm.runtime.sampling.params import SamplingParams

__all__ = ["Engine", "EngineArgs", "SamplingParams"]
