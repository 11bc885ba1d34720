"""What every Triton kernel module shares: interpreter detection and the fp32-accumulated dot.

On CPU the kernels run under Triton's interpreter only: TRITON_INTERPRET=1 must be set before triton
is first imported (the env var is read when `@triton.jit` decorates, including triton's own library
functions), so tests that interpret set it before importing triton or any of these modules.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Triton 3.9's interpreter computes tl.dot on bf16/fp16 operands from their raw bits (garbage), so
# when interpreting, the operands are upcast first. That is exact (a product of two bf16/fp16 values
# is exact in fp32 and the accumulation is fp32 either way); compiled kernels keep tensor-core dots.
INTERPRETED = bool(triton.knobs.runtime.interpret)


@triton.jit
def mma(a, b, UPCAST: tl.constexpr):
    """fp32-accumulated a @ b."""
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b, input_precision="ieee")
    return out
