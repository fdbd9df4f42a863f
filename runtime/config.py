"""The one configuration object of the runtime, built by the Engine (and later the CLI) and passed down."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


@dataclass
class EngineArgs:
    model_path: str | None = None  # None: the embedded SmolLM2-135M-Instruct
    tokenizer_path: str | None = None  # None: same as model_path
    dtype: str = "bfloat16"  # bf16 is faster than fp32 on our CPUs; tests use float32
    device: str = "cpu"
    context_length: int | None = None  # None: the model's max_position_embeddings
    # KV pool: a token count, or else a size in GiB.
    max_total_tokens: int | None = None
    kv_cache_gb: float = 1.0
    max_running_requests: int = 256
    chunked_prefill_size: int = 8192  # prefill token budget of one step; longer prompts go in chunks
    disable_radix_cache: bool = False
    schedule_policy: str = "lpm"  # fcfs | lpm | dfs-weight | priority (scheduler/policy.py)
    schedule_low_priority_values_first: bool = False  # as SGLang: by default a higher priority value goes first
    priority_aging_seconds: float = 10.0  # each this long in the queue raises a request's priority by one
    attention_backend: str = "auto"  # auto (triton on a GPU, else cpu) | cpu (C++, pool read in place) | torch | triton
    random_seed: int = 0
    num_threads: int | None = None  # torch intra-op threads; None leaves torch's default
    # Weight-only quantisation of the layer projections for few-row (decode) matmuls:
    # none | int8 | int4; None picks per dtype and CPU (runtime/model/execution.py says why).
    quantization: str | None = None
    # Decode steps as torch.compile'd graphs, one per batch-size bucket (CPU). None: on for bf16 and
    # fp16, off for float32 (the reference precision runs eagerly, as transformers does).
    compile_decode: bool | None = None
    compile_in_background: bool = True  # decode eagerly while a bucket's graph compiles
    # ... in a low-priority worker process (model/compile_worker.py says why), not on a thread here
    compile_worker: bool = True
    # Compile the decode graphs for batch sizes up to this before serving, as SGLang captures its
    # CUDA graphs at start-up; larger batches compile on first use. 0: all on first use.
    warmup_decode_bs: int = 0
    grammar_backend: str = "xgrammar"  # xgrammar | outlines (docs/benchmarks.md: why xgrammar)
    enable_jump_forward: bool = True  # append a grammar's forced strings without a decode step each
    # Where a JSON output (json_schema, json_object) is steered to close rather than loop to
    # max_tokens, if its grammar allows (constrained/json_guard.py); 0 = unbounded.
    json_max_string_length: int = 512  # characters in one string
    json_max_depth: int = 16  # objects and arrays open at once

    def __post_init__(self):
        from arborlm.runtime.model.execution import QUANTIZATIONS

        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization: expected one of {QUANTIZATIONS}, got {self.quantization!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype: expected one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.warmup_decode_bs < 0:
            raise ValueError(f"warmup_decode_bs: expected a batch size >= 0, got {self.warmup_decode_bs}")
        if self.attention_backend not in ("auto", "cpu", "torch", "triton"):
            raise ValueError(f"attention_backend: expected auto, cpu, torch or triton, got {self.attention_backend!r}")
        from arborlm.runtime.scheduler.policy import POLICIES

        if self.schedule_policy not in POLICIES:
            raise ValueError(f"schedule_policy: expected one of {POLICIES}, got {self.schedule_policy!r}")
        from arborlm.runtime.constrained.factory import BACKENDS

        if self.grammar_backend not in BACKENDS:
            raise ValueError(f"grammar_backend: expected one of {BACKENDS}, got {self.grammar_backend!r}")
        for name in ("json_max_string_length", "json_max_depth"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 = unbounded), got {getattr(self, name)}")
        for name in ("max_running_requests", "chunked_prefill_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_total_tokens is not None and self.max_total_tokens < 1:
            raise ValueError(f"max_total_tokens must be >= 1, got {self.max_total_tokens}")
        if self.priority_aging_seconds <= 0:
            raise ValueError(f"priority_aging_seconds must be > 0, got {self.priority_aging_seconds}")
        if self.kv_cache_gb <= 0:
            raise ValueError(f"kv_cache_gb must be > 0, got {self.kv_cache_gb}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @classmethod
    def from_kwargs(cls, model_path=None, **kwargs) -> "EngineArgs":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise TypeError(f"unknown engine argument(s): {', '.join(unknown)}")
        return cls(model_path=model_path, **kwargs)
