"""One step's adapter plan: which token rows use which adapter, and the tensors each layer applies.

The runner orders the packed batch so every adapter's tokens are contiguous (decodes grouped by
projection family, then slot; prefill segments are contiguous already) and hands the step's
`TokenGroup`s to the adapter manager, which asks each kind's slot store for its part of the plan. A
part is an AdapterDelta (`apply(layer, x, y)`) that holds, by reference, every tensor its kernels read
(slot factors, stacks, projection bases, per-step metadata): nothing is looked up outside the plan
during the forward pass. The torch parts are here; their Triton twins are in `kernels.batch_triton`.

    LoRA family (LoRA / rsLoRA / AdaLoRA / DoRA): applied per row range (`LoraRows`).
    VeRA, RandLoRA: applied per projection family, so the products with the family's shared bases are
    done once for all of its tokens (`VeraRows`, `RandLoraRows`).
Base-model tokens (slot −1) are in no group and cost nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from kernels.lora import LinearFactors, lora_rows_ref
from kernels.shared_bases import RandLoraProjection, VeraLayer, randlora_family_ref, vera_family_ref

if TYPE_CHECKING:
    from kernels.segments import StepBuffers


@dataclass(frozen=True, slots=True)
class TokenGroup:
    """Rows [start, end) of the packed batch all use the adapter in `slot`.

    Example: decodes of slots [3, 3, -1, 5] and a 4-token prefill for slot 3 give
    groups (3, 0, 2), (5, 3, 4), (3, 4, 8); row 2 is a base-model token and is in no group.
    """

    slot: int
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class ProjectionFamilyRows:
    """The tokens of one VeRA/RandLoRA projection family in this step.

    Example: groups (3, 0, 2), (5, 4, 6) of one projection family give rows = tensor([0, 1, 4, 5]),
    token_slots = tensor([3, 3, 5, 5]), members = [(slice(0, 2), 3), (slice(2, 4), 5)], span = (0, 6).
    """

    rows: slice | torch.Tensor  # the projection family's rows in the packed batch
    token_slots: torch.Tensor  # [n] adapter slot of each of those rows
    members: list[tuple[slice, int]]  # (rows within the projection family's tokens, slot)
    span: tuple[int, int] = (0, 0)  # [first row, last row + 1] of the projection family (host ints)

    @classmethod
    def of(cls, groups: list[TokenGroup], device: torch.device | str) -> ProjectionFamilyRows:
        members, offset = [], 0
        for g in groups:
            members.append((slice(offset, offset + g.end - g.start), g.slot))
            offset += g.end - g.start
        contiguous = all(a.end == b.start for a, b in zip(groups, groups[1:]))
        rows = (
            slice(groups[0].start, groups[-1].end)
            if contiguous
            else torch.tensor([i for g in groups for i in range(g.start, g.end)], device=device)
        )
        token_slots = torch.tensor([g.slot for g in groups for _ in range(g.start, g.end)], device=device)
        span = (min(g.start for g in groups), max(g.end for g in groups))
        return cls(rows, token_slots, members, span)


@dataclass(slots=True)
class StepInputs:
    """What every slot store's part of one step shares: its size, its form, and (Triton backend) the
    per-step buffers allocated once at startup. `projection_families` counts the projection families
    that took a token→slot row of `buffers.projection_slots` so far in this step."""

    num_tokens: int
    decode_only: bool  # one token per sequence: the Triton token form
    device: torch.device | str = "cpu"
    buffers: StepBuffers | None = None
    projection_families: int = 0


class LinearLike(Protocol):
    key: str
    in_features: int
    bias: torch.Tensor | None


class AdapterDelta(Protocol):
    def apply(self, layer: LinearLike, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...


class StepPlan:
    """A step whose adapters belong to more than one slot store: each store's part in turn (their rows
    are disjoint). A step with one store's adapters uses that part directly."""

    __slots__ = ("parts",)

    def __init__(self, parts: list[AdapterDelta]) -> None:
        self.parts = parts

    def apply(self, layer: LinearLike, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for part in self.parts:
            y = part.apply(layer, x, y)
        return y


class LoraRows:
    """LoRA-family adapters on the torch path, one row range at a time.

    Always at the process's thread count, as PEFT runs: on AVX-512 machines MKL picks another kernel for
    one thread than for two, and running small groups single-threaded (faster on an AVX2 machine) moved
    DoRA's logits 1.06e-4 away from PEFT's; at the same thread count they are bit-identical.

    bf16 (fp16) on a CPU: computed in float32 on float32 copies of the factors, rounded once into y. A
    small bf16 matmul costs oneDNN ~20 us of set-up whatever its size, five times an fp32 one, and a
    step makes ~2000 of them with 8 adapters: the bf16 adapter path took as long as the base model.
    Float32 is also the more accurate of the two (PEFT rounds x Aᵀ and the delta to bf16)."""

    __slots__ = ("groups", "slot_factors")

    def __init__(self, groups: list[TokenGroup], slot_factors: list[dict[str, LinearFactors] | None]) -> None:
        self.groups = groups
        self.slot_factors = slot_factors  # slot -> {layer key -> factors} (the store's list, by reference)

    def apply(self, layer: LinearLike, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.dtype != torch.float32 and x.device.type == "cpu":
            return self._apply_float32(layer, x, y)
        for group in self.groups:
            factors = self.slot_factors[group.slot].get(layer.key)
            if factors is not None:
                lora_rows_ref(x[group.start : group.end], y[group.start : group.end], layer.bias, factors)
        return y

    def _apply_float32(self, layer: LinearLike, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x32 = bias32 = None
        for group in self.groups:
            factors = self.slot_factors[group.slot].get(layer.key)
            if factors is None:
                continue
            if x32 is None:  # once per layer, and only when some group adapts it
                x32 = x.float()
                bias32 = None if layer.bias is None else layer.bias.float()
            rows = slice(group.start, group.end)
            y32 = y[rows].float()
            lora_rows_ref(x32[rows], y32, bias32, factors.float32())
            y[rows] = y32
        return y


class VeraRows:
    """One VeRA projection family's tokens on the torch path (`vera_family_ref` per packed layer)."""

    __slots__ = ("rows", "layers")

    def __init__(self, rows: ProjectionFamilyRows, layers: dict[str, VeraLayer]) -> None:
        self.rows = rows
        self.layers = layers  # layer key -> VeraLayer (the store's dict, by reference)

    def apply(self, layer: LinearLike, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        vera = self.layers.get(layer.key)
        if vera is not None:
            vera_family_ref(x, y, self.rows.rows, self.rows.token_slots, vera.A_l, vera.B, vera.stack)
        return y


class RandLoraRows:
    """One RandLoRA projection family's tokens on the torch path (`randlora_family_ref` per projection)."""

    __slots__ = ("rows", "layers")

    def __init__(
        self, rows: ProjectionFamilyRows, layers: dict[str, dict[tuple[int, int], RandLoraProjection]]
    ) -> None:
        self.rows = rows
        self.layers = layers  # layer key -> {(out_start, out_features) -> projection}

    def apply(self, layer: LinearLike, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for proj in self.layers.get(layer.key, {}).values():
            members = [(rows, proj.pieces[slot]) for rows, slot in self.rows.members]
            randlora_family_ref(
                x, y[:, proj.out_start : proj.out_start + proj.out_features], self.rows.rows, members, proj.V
            )
        return y
