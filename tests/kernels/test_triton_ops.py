"""Every Triton kernel equals its torch reference, run by Triton's interpreter on CPU.

TRITON_INTERPRET is read when `@triton.jit` decorates: when triton itself is imported (its library
functions are jit functions) and when the kernel modules are. The variable is set below before either;
if another module of this pytest process imported triton first without it, every check here is
skipped in-process and `test_triton_kernels_in_a_fresh_interpreted_process` reruns this file in a
subprocess with the variable set (and fails if any check there fails).

bf16 tolerance: both paths take the same bf16 inputs and accumulate in fp32; they differ in
roundings only. The kernel rounds once, on the final y (≤ eps/2·|y|); the reference rounds y too
(≤ eps/2·|y|) and also the product L = (xAᵀ)Bᵀ and L·scale (≤ eps/2·|δ| each, δ = the adapter's
delta); xAᵀ is rounded to bf16 in both, and a different fp32 summation order can flip that rounding
by one ulp in a few of its r entries (≤ eps·|δ|/√r-ish each). So |kernel − ref| ≤ eps·|ref| +
2·eps·max|δ| with eps = 2⁻⁷ (torch.finfo(bfloat16).eps). That is ~1.6% of the delta: a wrong
scale, slot, rank or column offset is off by O(|δ|) and fails.
"""

from __future__ import annotations

import os

# Before anything imports triton or a kernel module, and left set: triton also consults it lazily
# at launch (e.g. when it first imports its gluon package), so it must stay on for the whole process.
os.environ["TRITON_INTERPRET"] = "1"

import importlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from kernels.batch import LoraRows, TokenGroup
from kernels.segments import build_step_meta, lora_shrink_expand_ref
from kernels.shared_bases import randlora_family_ref, vera_family_ref
from tests.kernels.cases import (
    LORA_CASES,
    RANDLORA_CASES,
    VERA_CASES,
    close,
    lora_setup,
    randlora_setup,
    vera_setup,
)
from tests.kernels.helpers import adapter, slot_buffers


def _interpreting() -> bool:
    """True when this process's triton was imported in interpreter mode: triton's own library functions
    (tl.sum, tl.cdiv, ...) are `@jit`-decorated when triton is imported, so the env var only helps if
    it was set before *triton* was first imported, not just before the kernel modules."""
    from triton.language import standard

    return isinstance(standard.sum, InterpretedFunction)


def _load_interpreted(name: str):
    module = importlib.import_module(name)
    kernels = [v for k, v in vars(module).items() if k.endswith("_kernel")]
    if not all(isinstance(k, InterpretedFunction) for k in kernels):  # imported before the env var was set
        module = importlib.reload(module)
    return module


IN_PROCESS = _interpreting()
if IN_PROCESS:
    COMMON = _load_interpreted("kernels.triton_common")
    LORA_OPS = _load_interpreted("kernels.lora_triton")
    SB_OPS = _load_interpreted("kernels.shared_bases_triton")
# Otherwise another module imported triton compiled first: the checks below rerun in a fresh process.
interpreted = pytest.mark.skipif(not IN_PROCESS, reason="triton imported compiled: see the subprocess test")


@pytest.mark.skipif(IN_PROCESS, reason="triton runs interpreted in this process")
def test_triton_kernels_in_a_fresh_interpreted_process():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and " failed" not in done.stdout


@interpreted
def test_kernels_are_interpreted():
    kernels = [v for m in (LORA_OPS, SB_OPS) for k, v in vars(m).items() if k.startswith("_") and k.endswith("_kernel")]
    assert len(kernels) == 9 and all(isinstance(k, InterpretedFunction) for k in kernels)
    assert COMMON.INTERPRETED and isinstance(COMMON.mma, InterpretedFunction)


@interpreted
@pytest.mark.parametrize("name", list(LORA_CASES))
def test_lora_shrink_expand_both_forms_equal_reference(name):
    x, y0, b0, bufs, meta, dtype = lora_setup(LORA_CASES[name])
    ref = lora_shrink_expand_ref(x, y0.clone(), meta, bufs, b0)
    base_rows = meta.token_slots[: x.shape[0]] < 0
    for form in ("segments", "tokens"):
        h = LORA_OPS.alloc_shrink_buffer(bufs, meta.max_tokens)
        got = LORA_OPS.lora_apply(x, y0.clone(), bufs, meta, h, form, base_bias=b0)
        close(got, ref, y0, dtype)
        assert torch.equal(got[base_rows], y0[base_rows]), f"{form}: base rows must be untouched"


@interpreted
def test_lora_expand_overwrite_mode_writes_only_adapted_entries():
    x, y0, _, bufs, meta, _ = lora_setup(LORA_CASES["qkv-many-base-empty"])
    ref = lora_shrink_expand_ref(x, torch.zeros_like(y0), meta, bufs)  # delta alone
    adapted = torch.zeros_like(y0, dtype=torch.bool)
    for slot, start, end in [(s, a, b) for s, a, b in [(0, 0, 3), (2, 4, 9), (3, 10, 11), (1, 12, 19), (2, 20, 21)]]:
        for j, (c0, n) in enumerate(bufs.out_slices):
            if bufs.slot_ranks[j, slot] > 0:
                adapted[start:end, c0 : c0 + n] = True
    for form in ("segments", "tokens"):
        h = LORA_OPS.lora_shrink(x, bufs, meta, LORA_OPS.alloc_shrink_buffer(bufs, meta.max_tokens), form)
        got = LORA_OPS.lora_expand(h, y0.clone(), bufs, meta, form, accumulate=False)
        torch.testing.assert_close(got[adapted], ref[adapted], atol=1e-5, rtol=0)
        assert torch.equal(got[~adapted], y0[~adapted])


@interpreted
@pytest.mark.parametrize("name", list(VERA_CASES))
def test_vera_packed_gather_scale_equals_reference(name):
    x, y0, A_l, B, stack, slots, rows, adapted, dtype = vera_setup(VERA_CASES[name])
    ref = y0.clone()
    vera_family_ref(x, ref, rows, slots[rows].long(), A_l, B, stack)
    got = SB_OPS.vera_apply(x, y0.clone(), A_l, B, stack, slots)
    close(got, ref, y0, dtype)
    untouched = torch.ones_like(y0, dtype=torch.bool)
    for out_start, size in adapted:
        untouched[rows, out_start : out_start + size] = False
    assert torch.equal(got[untouched], y0[untouched]), "base rows, other columns and inactive projections stay"


@interpreted
@pytest.mark.parametrize("name", list(RANDLORA_CASES))
def test_randlora_factored_gather_equals_reference(name):
    c = RANDLORA_CASES[name]
    gen, dtype, A_l, V, stack, pieces = randlora_setup(c)
    T = len(c["slots"])
    x = torch.randn(T, c["in_f"], generator=gen).to(dtype)
    y0 = torch.randn(T, 7 + c["out"] + 5, generator=gen).to(dtype)  # the projection sits at columns 7:7+out
    slots = torch.tensor(c["slots"], dtype=torch.int32)
    rows = torch.nonzero(slots >= 0).flatten()
    members = [(slice(i, i + 1), pieces[int(slots[row])]) for i, row in enumerate(rows.tolist())]
    ref = y0.clone()
    randlora_family_ref(x, ref[:, 7 : 7 + c["out"]], rows, members, V)
    got = SB_OPS.randlora_apply(x, y0.clone(), A_l, V, stack, slots, out_start=7)
    close(got, ref, y0, dtype, delta_eps=3)
    untouched = torch.ones_like(y0, dtype=torch.bool)
    untouched[rows, 7 : 7 + c["out"]] = False
    assert torch.equal(got[untouched], y0[untouched]), "only the family's rows and the projection's columns change"


@interpreted
def test_randlora_slot_without_adapter_adds_nothing():
    """A cleared slot (scale 0, λ = Γ = 0) contributes exactly zero, and rows outside the family never read
    the scratch (NaN there would show)."""
    c = RANDLORA_CASES["in97-out64-r1-interleaved"]
    gen, dtype, A_l, V, stack, _ = randlora_setup(c)
    stack.clear(3)
    x = torch.randn(4, c["in_f"], generator=gen)
    y0 = torch.randn(4, 7 + c["out"], generator=gen)
    slots = torch.tensor([3, 3, -1, 3], dtype=torch.int32)
    scratch = torch.full((8, 64), float("nan"))  # stale scratch rows (another family's) must never be read
    got = SB_OPS.randlora_apply(x, y0.clone(), A_l, V, stack, slots, out_start=7, h=scratch)
    assert torch.equal(got, y0)


class _Layer(torch.nn.Module):
    """An AdaptedLinear-like layer: y = x W0ᵀ + b0 + adapters.apply(layer, x, y)."""

    def __init__(self, key: str, in_f: int, out_slices: list[tuple[int, int]], gen: torch.Generator) -> None:
        super().__init__()
        total = max(s + o for s, o in out_slices)
        self.key, self.in_features, self.out_slices = key, in_f, out_slices
        self.weight = torch.randn(total, in_f, generator=gen) / in_f**0.5
        self.bias = torch.randn(total, generator=gen)

    def forward(self, x: torch.Tensor, adapters) -> torch.Tensor:
        return adapters.apply(self, x, torch.nn.functional.linear(x, self.weight, self.bias))


class _TritonDelta:
    """The Triton path as an AdapterDelta: per-layer slot buffers, one step's metadata."""

    def __init__(self, bufs: dict, meta, form: str) -> None:
        self.bufs, self.meta, self.form = bufs, meta, form

    def apply(self, layer: _Layer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b = self.bufs[layer.key]
        h = LORA_OPS.alloc_shrink_buffer(b, self.meta.max_tokens)
        return LORA_OPS.lora_apply(x, y, b, self.meta, h, self.form, base_bias=layer.bias)


@interpreted
def test_toy_two_layer_forward_mixed_lora_dora_batch_matches_torch_path():
    gen = torch.Generator().manual_seed(3)
    qkv = _Layer("qkv", 64, [(0, 64), (64, 32), (96, 32)], gen)
    o = _Layer("o", 128, [(0, 64)], gen)
    layers = [qkv, o]
    plan = {0: dict(rank=8, dora=False), 1: dict(rank=13, dora=True), 2: dict(rank=1, dora=False)}
    slot_factors = [
        {lin.key: adapter(lin.out_slices, lin.in_features, p["rank"], gen, dora=p["dora"], scale=0.5) for lin in layers}
        for p in plan.values()
    ]
    groups = [TokenGroup(0, 0, 2), TokenGroup(1, 3, 4), TokenGroup(2, 4, 5), TokenGroup(1, 5, 12)]
    T = 13
    x = torch.randn(T, 64, generator=gen)

    def forward(delta) -> torch.Tensor:
        return o(torch.nn.functional.silu(qkv(x, delta)), delta)

    torch_path = forward(LoraRows(groups, slot_factors))
    base = forward(LoraRows([], slot_factors))
    bufs = {
        lin.key: slot_buffers(
            lin.in_features,
            lin.out_slices,
            {s: f[lin.key] for s, f in enumerate(slot_factors)},
            max_slots=4,
            max_rank=16,
        )
        for lin in layers
    }
    meta = build_step_meta([(g.slot, g.start, g.end) for g in groups], T, max_tokens=16, max_segments=6)
    for form in ("segments", "tokens"):
        close(forward(_TritonDelta(bufs, meta, form)), torch_path, base, torch.float32)
