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
from kernels.shared_bases import randlora_family_ref, randlora_u, vera_family_ref
from tests.kernels.helpers import adapter, slot_buffers, to_dtype

BF16_EPS = torch.finfo(torch.bfloat16).eps


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


def _close(got: torch.Tensor, ref: torch.Tensor, y0: torch.Tensor, dtype: torch.dtype, delta_eps: float = 2) -> None:
    delta = (ref.float() - y0.float()).abs().max().item()
    assert delta > 0.1, "the adapters must change the output, else the check is vacuous"
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    else:
        err = (got.float() - ref.float()).abs()
        bound = BF16_EPS * ref.float().abs() + delta_eps * BF16_EPS * delta
        assert (err <= bound).all(), f"max err {err.max():.3g}, worst excess {(err - bound).max():.3g}"


# One combined grid: ranks {1, 8, 13, 64}, in/out {64, 576, 97}, packed q/k/v slices, layouts with one
# adapter, many, base (−1) rows interleaved, an empty segment, a single token; DoRA/bias; fp32 and bf16.
LORA_CASES = {
    "one-adapter-r8": dict(in_f=64, out_slices=[(0, 64)], ranks={0: 8}, groups=[(0, 0, 20)], T=20),
    "qkv-many-base-empty": dict(
        in_f=97,
        out_slices=[(0, 64), (64, 33), (97, 33)],
        ranks={0: 1, 1: 13, 2: 64, 3: 8},
        groups=[(0, 0, 3), (2, 4, 9), (1, 9, 9), (3, 10, 11), (1, 12, 19), (2, 20, 21)],
        T=22,
    ),
    "dora-bias-mixed": dict(
        in_f=97,
        out_slices=[(0, 97), (97, 64)],
        ranks={0: 13, 1: 8, 2: 64},
        groups=[(1, 0, 2), (0, 3, 6), (2, 6, 8)],
        T=9,
        mixed=True,
    ),
    "in576-single-token": dict(in_f=576, out_slices=[(0, 64)], ranks={1: 13}, groups=[(1, 0, 1)], T=1),
    "out576-bf16": dict(
        in_f=64, out_slices=[(0, 576)], ranks={0: 64, 2: 1}, groups=[(2, 0, 2), (0, 3, 5)], T=5, dtype=torch.bfloat16
    ),
    "qkv-many-bf16": dict(
        in_f=97,
        out_slices=[(0, 64), (64, 33), (97, 33)],
        ranks={0: 1, 1: 13, 2: 64},
        groups=[(0, 0, 3), (2, 4, 9), (1, 10, 10), (1, 11, 17)],
        T=18,
        dtype=torch.bfloat16,
        mixed=True,
    ),
}


def _lora_setup(case: dict, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    dtype = case.get("dtype", torch.float32)
    in_f, out_slices, T = case["in_f"], case["out_slices"], case["T"]
    adapters = {}
    for slot, rank in case["ranks"].items():
        mixed = case.get("mixed", False)
        kw = dict(dora=mixed and slot == 1, bias=mixed and slot == 2, scale=[2.0, 0.3, 0.7, 1.0][slot])
        only = [0] if (mixed and slot == 0 and len(out_slices) > 1) else None  # rank 0 on other projections
        adapters[slot] = to_dtype(adapter(out_slices, in_f, rank, gen, only=only, **kw), dtype)
    bufs = slot_buffers(in_f, out_slices, adapters, max_slots=5, max_rank=64, dtype=dtype, poison_padding=True)
    total = max(s + o for s, o in out_slices)
    x = torch.randn(T, in_f, generator=gen).to(dtype)
    y0 = torch.randn(T, total, generator=gen).to(dtype)
    b0 = torch.randn(total, generator=gen).to(dtype)
    meta = build_step_meta(case["groups"], T, max_tokens=T + 3, max_segments=len(case["groups"]) + 2)
    return x, y0, b0, bufs, meta, dtype


@interpreted
@pytest.mark.parametrize("name", list(LORA_CASES))
def test_lora_shrink_expand_both_forms_equal_reference(name):
    x, y0, b0, bufs, meta, dtype = _lora_setup(LORA_CASES[name])
    ref = lora_shrink_expand_ref(x, y0.clone(), meta, bufs, b0)
    base_rows = meta.token_slots[: x.shape[0]] < 0
    for form in ("segments", "tokens"):
        h = LORA_OPS.alloc_shrink_buffer(bufs, meta.max_tokens)
        got = LORA_OPS.lora_apply(x, y0.clone(), bufs, meta, h, form, base_bias=b0)
        _close(got, ref, y0, dtype)
        assert torch.equal(got[base_rows], y0[base_rows]), f"{form}: base rows must be untouched"


@interpreted
def test_lora_expand_overwrite_mode_writes_only_adapted_entries():
    x, y0, _, bufs, meta, _ = _lora_setup(LORA_CASES["qkv-many-base-empty"])
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


# VeRA: shared bases A_l [r, in], B [max out, r] (B_l of projection j = B[:out_j]); a VeraStack over the
# layer's packed projections, where slot 3 adapts only the first projection and, in the packed cases, no
# slot adapts the last one (inactive: no work, columns untouched).
VERA_CASES = {
    "r13-in97-out576-interleaved": dict(
        r=13, in_f=97, outs=[576], slots=[0, -1, 2, 2, -1, 1, 0, 3], dtype=torch.float32
    ),
    "r64-in576-out97-single": dict(r=64, in_f=576, outs=[97], slots=[2], dtype=torch.float32),
    "r8-qkv-packed": dict(r=8, in_f=64, outs=[64, 33, 33], slots=[1, 3, -1, 0, 0, 2, -1, 3], dtype=torch.float32),
    "r1-gate-up-packed": dict(r=1, in_f=97, outs=[97, 97], slots=[2, -1, 0], dtype=torch.float32),
    "r8-in64-out64-bf16": dict(r=8, in_f=64, outs=[64], slots=[1, 1, -1, 0, 3, 3, 3, -1, 2] * 2, dtype=torch.bfloat16),
    "r13-qkv-packed-bf16": dict(r=13, in_f=97, outs=[97, 64, 64], slots=[0, 3, 3, -1, 1, 2, 2], dtype=torch.bfloat16),
}


@interpreted
@pytest.mark.parametrize("name", list(VERA_CASES))
def test_vera_packed_gather_scale_equals_reference(name):
    from kernels.shared_bases import VeraStack

    c = VERA_CASES[name]
    gen = torch.Generator().manual_seed(2)
    dtype, r, T, outs = c["dtype"], c["r"], len(c["slots"]), c["outs"]
    out_slices, start = [], 7  # the layer's packed output starts at column 7 of y
    for size in outs:
        out_slices.append((start, size))
        start += size
    A_l = (torch.randn(r, c["in_f"], generator=gen) / c["in_f"] ** 0.5).to(dtype)
    B = (torch.randn(max(outs), r, generator=gen) / r**0.5).to(dtype)
    stack = VeraStack(out_slices, 4, r, dtype)
    adapted = out_slices[:-1] if len(out_slices) > 1 else out_slices
    for slot in range(4):
        for where in adapted[:1] if slot == 3 else adapted:
            stack.write(
                slot,
                where,
                (torch.rand(r, generator=gen) + 0.5).to(dtype),
                torch.randn(where[1], generator=gen).to(dtype),
            )
    x = torch.randn(T, c["in_f"], generator=gen).to(dtype)
    y0 = torch.randn(T, start + 5, generator=gen).to(dtype)
    slots = torch.tensor(c["slots"], dtype=torch.int32)
    rows = torch.nonzero(slots >= 0).flatten()
    ref = y0.clone()
    vera_family_ref(x, ref, rows, slots[rows].long(), A_l, B, stack)
    got = SB_OPS.vera_apply(x, y0.clone(), A_l, B, stack, slots)
    _close(got, ref, y0, dtype)
    untouched = torch.ones_like(y0, dtype=torch.bool)
    for out_start, size in adapted:
        untouched[rows, out_start : out_start + size] = False
    assert torch.equal(got[untouched], y0[untouched]), "base rows, other columns and inactive projections stay"


# RandLoRA: family bases A_l [r, 1, min], V [max, nb·r]; per-slot λ [r, nb], Γ [nb, min] (fp32), scale.
# The reference multiplies by each adapter's materialised U = λ ⊙ A_l ⊙ Γ (PEFT's form, what the torch path
# runs); the kernels never build U. bf16: the reference also rounds U itself (≤ eps/2 per entry), which moves
# δ by up to ~eps·|δ| more than the LoRA case, hence 3·eps·max|δ| instead of 2.
RANDLORA_CASES = {
    "in64-out97-r8-interleaved": dict(r=8, in_f=64, out=97, slots=[0, -1, 2, 2, -1, 1, 0, 3], dtype=torch.float32),
    "in97-out576-r13": dict(r=13, in_f=97, out=576, slots=[1, 1, 2, -1, 0], dtype=torch.float32),
    "in576-out64-r8-single": dict(r=8, in_f=576, out=64, slots=[2], dtype=torch.float32),
    "in97-out64-r1-interleaved": dict(r=1, in_f=97, out=64, slots=[-1, 3, 3, 0, -1, 2, 3], dtype=torch.float32),
    "in576-out97-r64": dict(r=64, in_f=576, out=97, slots=[0, 2, -1, 2], dtype=torch.float32),
    "in64-out64-r8-bf16": dict(r=8, in_f=64, out=64, slots=[1, 1, -1, 0, 3, 3, -1, 2] * 2, dtype=torch.bfloat16),
    "in97-out64-r13-bf16": dict(r=13, in_f=97, out=64, slots=[2, 0, 0, -1, 1], dtype=torch.bfloat16),
}


def _randlora_setup(c: dict, seed: int = 4):
    from kernels.shared_bases import RandLoraSlice, RandLoraStack

    gen = torch.Generator().manual_seed(seed)
    dtype, r, in_f, out = c["dtype"], c["r"], c["in_f"], c["out"]
    min_l, max_l = min(in_f, out), max(in_f, out)
    nb = -(-min_l // r)
    A_l = (torch.randn(r, 1, min_l, generator=gen) / min_l**0.5).to(dtype)
    V = (torch.randn(max_l, nb * r, generator=gen) / (nb * r) ** 0.5).to(dtype)
    stack = RandLoraStack.empty(4, r, nb, min_l, in_le_out=in_f <= out)
    pieces = {}
    for slot in range(4):
        lam, gamma = torch.rand(r, nb, generator=gen) + 0.5, torch.randn(nb, min_l, generator=gen)
        scale = [0.5, 2.0, 0.75, 1.0][slot]
        stack.write(slot, lam, gamma, scale)
        pieces[slot] = RandLoraSlice(randlora_u(lam, gamma, A_l).to(dtype), scale)  # as the RandLoRA store builds it
    return gen, dtype, A_l, V, stack, pieces


@interpreted
@pytest.mark.parametrize("name", list(RANDLORA_CASES))
def test_randlora_factored_gather_equals_reference(name):
    c = RANDLORA_CASES[name]
    gen, dtype, A_l, V, stack, pieces = _randlora_setup(c)
    T = len(c["slots"])
    x = torch.randn(T, c["in_f"], generator=gen).to(dtype)
    y0 = torch.randn(T, 7 + c["out"] + 5, generator=gen).to(dtype)  # the projection sits at columns 7:7+out
    slots = torch.tensor(c["slots"], dtype=torch.int32)
    rows = torch.nonzero(slots >= 0).flatten()
    members = [(slice(i, i + 1), pieces[int(slots[row])]) for i, row in enumerate(rows.tolist())]
    ref = y0.clone()
    randlora_family_ref(x, ref[:, 7 : 7 + c["out"]], rows, members, V)
    got = SB_OPS.randlora_apply(x, y0.clone(), A_l, V, stack, slots, out_start=7)
    _close(got, ref, y0, dtype, delta_eps=3)
    untouched = torch.ones_like(y0, dtype=torch.bool)
    untouched[rows, 7 : 7 + c["out"]] = False
    assert torch.equal(got[untouched], y0[untouched]), "only the family's rows and the projection's columns change"


@interpreted
def test_randlora_slot_without_adapter_adds_nothing():
    """A cleared slot (scale 0, λ = Γ = 0) contributes exactly zero, and rows outside the family never read
    the scratch (NaN there would show)."""
    c = RANDLORA_CASES["in97-out64-r1-interleaved"]
    gen, dtype, A_l, V, stack, _ = _randlora_setup(c)
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
        _close(forward(_TritonDelta(bufs, meta, form)), torch_path, base, torch.float32)
