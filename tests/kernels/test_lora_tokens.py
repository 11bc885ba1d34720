"""The token-form LoRA op of the compiled decode step (`kernels.lora_tokens`) against the eager reference
(`kernels.lora.lora_rows_ref`), run eagerly on small sizes: same delta within fp32 rounding, for mixed
ranks, DoRA, lora bias, base rows and layers an adapter skips; and the stack's slot bookkeeping."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from kernels.lora import lora_rows_ref
from kernels.lora_tokens import MIN_RANK_BUCKET, TokenLoraStack, lora_tokens
from tests.kernels.helpers import adapter

QKV = [(0, 32), (32, 16), (48, 16)]
IN = 24


def _layer(key: str, out_slices: list[tuple[int, int]]) -> SimpleNamespace:
    slices = [SimpleNamespace(out_start=a, out_features=b) for a, b in out_slices]
    return SimpleNamespace(key=key, in_features=IN, slices=slices)


def _stack():
    gen = torch.Generator().manual_seed(0)
    layers = [_layer("qkv", QKV), _layer("o", [(0, IN)])]
    stack = TokenLoraStack(layers, num_slots=4, dtype=torch.float32)
    factors = [
        {"qkv": adapter(QKV, IN, 4, gen)},  # q,k,v only: skips "o"
        None,
        {"qkv": adapter(QKV, IN, 8, gen, only=[0, 2], dora=True, bias=True), "o": adapter([(0, IN)], IN, 20, gen)},
        None,
    ]
    stack.sync(factors)
    return stack, factors, gen


def test_token_form_equals_the_grouped_reference():
    stack, factors, gen = _stack()
    assert stack.rank == 32, "rank 20 grows the bucket to the next power of two"
    token_slots = torch.tensor([0, 0, stack.empty_slot, 2, 2, stack.empty_slot])  # base rows in between
    index = stack.token_index(token_slots)
    assert index[stack.index_of["o"]].tolist() == [4, 4, 4, 2, 2, 4], "slot 0 skips o: it reads the empty slot"
    x = torch.randn(6, IN, generator=gen)
    for key, out, sizes in (("qkv", 64, [32, 16, 16]), ("o", IN, [IN])):
        y, base_bias = torch.randn(6, out, generator=gen), torch.randn(out, generator=gen)
        expected = y.clone()
        for slot, rows in ((0, slice(0, 2)), (2, slice(3, 5))):
            if key in factors[slot]:
                lora_rows_ref(x[rows], expected[rows], base_bias, factors[slot][key])
        layer = stack.layers[key]
        got = lora_tokens(x, y, index[stack.index_of[key]], *layer.tensors(), sizes, base_bias=base_bias)
        assert (expected - y).abs().max() > 0.1, "the adapters must change the output"
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        assert torch.equal(got[[2, 5]], y[[2, 5]]), "base rows are untouched"


def test_sync_rewrites_only_changed_slots_and_clears_to_the_empty_state():
    stack, factors, _ = _stack()
    writes = stack.writes
    stack.sync(factors)
    assert stack.writes == writes, "unchanged slots are not copied again"
    factors[2] = None
    stack.sync(factors)
    layer = stack.layers["o"]
    assert not stack.adapted("o") and stack.adapted("qkv")
    assert layer.A[:, 2].abs().sum() == 0 and layer.Bt[2].abs().sum() == 0 and torch.all(layer.g[2] == 1)
    assert not stack.adapts[:, 2].any()
    empty = stack.empty_slot
    for layer in stack.layers.values():  # the empty slot never holds anything
        assert layer.A[:, empty].abs().sum() == 0 and layer.col_scale[empty].abs().sum() == 0
    assert MIN_RANK_BUCKET <= stack.rank
