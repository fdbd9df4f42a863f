"""How this machine runs the model: activation dtype, weight forms and the compiled decode step,
picked from the CPU's features and the user's dtype / quantization.

Measured on 2-core machines of our kind (docs/benchmarks.md has the figures):
- A one-row decode matmul is bound by memory bandwidth: weight-only int4 (torch's
  `_weight_int4pack_mm_for_cpu`, bf16 activations) reads a quarter of bf16's bytes and takes
  about a third of its time; it loses to a dense GEMM from a few rows on, so batches use the
  dense weight. The dense weight of a quantised model is its own dequantised values, so a
  request gets the same weights whatever the batch size.
- With native bf16 (AVX512-BF16 / AMX) a bf16 GEMM is the fastest batched path. Without it
  (AVX2-only) torch emulates bf16 and a batched bf16 GEMM is ~7x slower than fp32, so such a CPU
  computes in fp32 and keeps bf16 only on the int4 kernel's activations.
- float32 keeps exact weights and no quantisation: the test suite's token-identity checks
  against transformers run there.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

QUANTIZATIONS = ("none", "int8", "int4")


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native_bf16() -> bool:
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def cpu_summary() -> str:
    """The features that decide the path, e.g. 'avx2 avx512f avx512_bf16 amx_bf16'."""
    have = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in cpu_flags()]
    return " ".join(have) or "none of avx2/avx512"


@dataclass(frozen=True)
class ExecutionPlan:
    dtype: torch.dtype  # what the user asked for (weights as stored)
    act_dtype: torch.dtype  # activations, the KV pool and the dense weight batched matmuls use
    quantization: str  # none | int8 | int4: the weight-only form of one-row matmuls
    small_rows: int  # rows up to which the quantised weight is used
    compile_decode: bool  # run decode steps as torch.compile'd graphs

    def describe(self) -> str:
        dt = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
        q = "" if self.quantization == "none" else f", {self.quantization} weights for <= {self.small_rows} rows"
        return (f"{dt[self.act_dtype]} activations, {dt[self.act_dtype]} dense weights{q}, "
                f"decode {'compiled' if self.compile_decode else 'eager'}; cpu: {cpu_summary()}")


def plan_execution(dtype: torch.dtype, quantization: str | None, device: str = "cpu",
                   compile_decode: bool | None = None) -> ExecutionPlan:
    """`quantization=None` picks the default: int4 for bf16 (the embedded model is a 4-bit
    checkpoint, and the int4 kernel is the fastest one-row path on both kinds of CPU), none
    otherwise."""
    if quantization is None:
        quantization = "int4" if dtype == torch.bfloat16 and device == "cpu" else "none"
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization: expected one of {QUANTIZATIONS}, got {quantization!r}")
    if quantization != "none" and device != "cpu":
        raise ValueError(f"quantization {quantization!r} is implemented for the CPU only")
    native = cpu_has_native_bf16()
    act = torch.float32 if dtype == torch.bfloat16 and device == "cpu" and not native else dtype
    small_rows = 4 if native else 1
    if compile_decode is None:
        compile_decode = dtype != torch.float32
    compile_decode = compile_decode and device == "cpu"
    return ExecutionPlan(dtype=dtype, act_dtype=act, quantization=quantization,
                         small_rows=small_rows, compile_decode=compile_decode)
