"""Triton kernels, each beside a plain-torch reference of the same signature.

On a CPU they run under Triton's interpreter, which is chosen when a kernel is defined: set
TRITON_INTERPRET=1 before this package is first imported.
"""

from arborlm.kernels.activation import silu_and_mul, silu_and_mul_ref
from arborlm.kernels.decode_attention import decode_attention, decode_attention_ref
from arborlm.kernels.extend_attention import extend_attention, extend_attention_ref
from arborlm.kernels.rmsnorm import rmsnorm, rmsnorm_ref
from arborlm.kernels.rope import rope, rope_ref


def interpreted() -> bool:
    """Whether these kernels were defined for Triton's CPU interpreter rather than compiled for a GPU."""
    from triton.runtime.interpreter import InterpretedFunction

    from arborlm.kernels.rmsnorm import _rmsnorm_kernel

    return isinstance(_rmsnorm_kernel, InterpretedFunction)


__all__ = [
    "decode_attention", "decode_attention_ref", "extend_attention", "extend_attention_ref", "interpreted",
    "rmsnorm", "rmsnorm_ref", "rope", "rope_ref", "silu_and_mul", "silu_and_mul_ref",
]
