"""Every Triton kernel compiles for real NVIDIA GPUs (sm_80 and sm_90) down to a cubin, without a GPU.

The interpreter tests prove the kernels' arithmetic; they cannot catch what only the compiler rejects
(a dot below the minimum tile size, a dtype mix, an op the backend lacks). Triton ships ptxas, so
`triton.compile` with an explicit GPUTarget builds the cubin here. It must run in a process where
triton is not in interpreter mode, which this pytest process may be (test_triton_ops sets
TRITON_INTERPRET=1), so the compilation runs in a fresh subprocess (`python -m` this module).
The bf16 variants of the tiled kernels are also checked to use tensor-core MMA instructions.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

INT_ARRAYS = {
    "token_slots",
    "seg_starts",
    "seg_lens",
    "seg_slots",
    "num_segments",
    "ranks_ptr",
    "out_starts",
    "out_sizes",
    "active",
}
FP32_SCRATCH = {"h_ptr", "p_ptr", "scales_ptr", "scale_ptr"}

# kernel name -> (pointer args that are float32 whatever the model dtype, constexpr variants, must use MMA)
KERNELS = {
    "lora_triton._lora_shrink_seg_kernel": ((), [dict(BLOCK_M=16, BLOCK_R=16, BLOCK_K=64, UPCAST=False)], True),
    "lora_triton._lora_shrink_tok_kernel": ((), [dict(BLOCK_R=16, BLOCK_K=64)], False),
    "lora_triton._lora_expand_seg_kernel": (
        (),
        [
            dict(
                BLOCK_M=16,
                BLOCK_N=64,
                BLOCK_R=16,
                ACCUMULATE=True,
                HAS_BIAS=False,
                HAS_DORA=False,
                HAS_BASE_BIAS=False,
                UPCAST=False,
            ),
            dict(
                BLOCK_M=16,
                BLOCK_N=64,
                BLOCK_R=16,
                ACCUMULATE=True,
                HAS_BIAS=True,
                HAS_DORA=True,
                HAS_BASE_BIAS=True,
                UPCAST=False,
            ),
            dict(
                BLOCK_M=16,
                BLOCK_N=64,
                BLOCK_R=16,
                ACCUMULATE=False,
                HAS_BIAS=True,
                HAS_DORA=False,
                HAS_BASE_BIAS=False,
                UPCAST=False,
            ),
        ],
        True,
    ),
    "lora_triton._lora_expand_tok_kernel": (
        (),
        [dict(BLOCK_N=64, BLOCK_R=16, ACCUMULATE=True, HAS_BIAS=True, HAS_DORA=True, HAS_BASE_BIAS=True)],
        False,
    ),
    "shared_bases_triton._gathered_shrink_kernel": (
        (),
        [
            dict(BLOCK_M=16, BLOCK_R=16, BLOCK_K=64, HAS_LAM=False, UPCAST=False),
            dict(BLOCK_M=16, BLOCK_R=16, BLOCK_K=64, HAS_LAM=True, UPCAST=False),
        ],
        True,
    ),
    "shared_bases_triton._gathered_expand_kernel": (
        ("lam_ptr",),
        [dict(BLOCK_M=16, BLOCK_N=64, BLOCK_R=16, UPCAST=False)],
        True,
    ),
    "shared_bases_triton._vera_expand_kernel": ((), [dict(BLOCK_M=16, BLOCK_N=64, BLOCK_R=16, UPCAST=False)], True),
    "shared_bases_triton._randlora_gamma_shrink_kernel": (
        ("lam_ptr", "gam_ptr"),
        [dict(BLOCK_B=32, BLOCK_I=32, BLOCK_C=64)],
        False,
    ),
    "shared_bases_triton._randlora_gamma_expand_kernel": (
        ("lam_ptr", "gam_ptr"),
        [dict(BLOCK_B=32, BLOCK_I=32, BLOCK_C=64)],
        False,
    ),
}


def test_every_kernel_compiles_to_a_cubin_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    done = subprocess.run(
        [sys.executable, "-m", "tests.kernels.test_triton_compiles_for_cuda"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    expected = sum(len(variants) for _, variants, _ in KERNELS.values()) * 2 * 2  # × dtypes × archs
    assert f"COMPILED {expected}" in done.stdout, done.stdout[-2000:]


# ------------------------------------------------------------------------------ the subprocess side
def _signature(kernel, dtype: str, fp32_args: tuple[str, ...], constexprs: dict) -> dict[str, str]:
    sig = {}
    for name in kernel.arg_names:
        if name in INT_ARRAYS:
            sig[name] = "*i32"
        elif name in FP32_SCRATCH or name in fp32_args:
            sig[name] = "*fp32"
        elif name.endswith("_ptr"):
            sig[name] = f"*{dtype}"
        elif name in constexprs:
            sig[name] = "constexpr"
        else:
            sig[name] = "i32"
    return sig


def main() -> None:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    assert not triton.knobs.runtime.interpret
    compiled = 0
    for qualname, (fp32_args, variants, needs_mma) in KERNELS.items():
        module, name = qualname.split(".")
        kernel = getattr(importlib.import_module(f"kernels.{module}"), name)
        for dtype in ("fp32", "bf16"):
            for constexprs in variants:
                for arch in (80, 90):
                    src = ASTSource(
                        fn=kernel,
                        signature=_signature(kernel, dtype, fp32_args, constexprs),
                        constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()},
                    )
                    binary = triton.compile(src, target=GPUTarget("cuda", arch, 32))
                    assert binary.asm["cubin"], f"{qualname} {dtype} sm_{arch}: no cubin"
                    ptx = binary.asm["ptx"]
                    if needs_mma and dtype == "bf16":
                        assert "mma" in ptx or "wgmma" in ptx, f"{qualname} bf16 sm_{arch}: no tensor-core MMA"
                    compiled += 1
                    print(f"ok {qualname} {dtype} sm_{arch} {constexprs}")
    print(f"COMPILED {compiled}")


if __name__ == "__main__":
    main()
