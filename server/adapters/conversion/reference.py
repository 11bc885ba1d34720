"""Logits of the base model with some layers' weights changed, for a conversion's max logit difference.

The engine thread owns the model and may have an adapter merged into its weights at any moment
(`server/adapters/merge.py` rebinds them), so this never runs the live layers' weights: a shadow of
the model shares every tensor with it (no copy) except the adaptable layers', which point at the
frozen base W0. A change is applied the way merged mode applies an adapter, `W0 + ΔW` in float32
cast once to the model dtype (docs/adapters.md §7), on the fly per layer, so memory holds one
layer's ΔW at a time. The shadow's forward only reads shared tensors, so it can run beside the engine.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from server.adapters.frozen_base import FrozenBase
from server.model.context import ForwardContext
from server.model.layers import AdaptedLinear
from server.model.llama import LlamaModel

# path -> (ΔW [out, in], Δbias [out] or None) in float32, or None for a layer left unchanged.
Delta = Callable[[str], tuple[torch.Tensor, torch.Tensor | None] | None]

PROMPTS = (
    "The capital of France is",
    "Write a short poem about the sea.",
    "def fibonacci(n):",
    "Explain in one sentence why the sky is blue.",
)
MAX_PROMPT_TOKENS = 32


class _MergedLayers:
    """The forward's AdapterDelta: a changed projection's rows are recomputed with W0 + ΔW."""

    def __init__(self, delta: Delta) -> None:
        self.delta = delta

    def apply(self, layer: AdaptedLinear, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for s in layer.slices:
            change = self.delta(s.path)
            if change is None:
                continue
            dw, db = change
            rows = slice(s.out_start, s.out_start + s.out_features)
            w0 = layer.weight[rows]
            weight = (w0.float() + dw.to(w0.device)).to(w0.dtype)
            bias = None if layer.bias is None else layer.bias[rows].float()
            if db is not None:
                bias = db.to(w0.device) if bias is None else bias + db.to(w0.device)
            y[:, rows] = F.linear(x, weight, None if bias is None else bias.to(w0.dtype))
        return y


class ReferenceModel:
    def __init__(self, model: LlamaModel, base: FrozenBase) -> None:
        shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
        self.model = copy.deepcopy(model, shared)  # new modules, the same tensors
        for shadow, linear in zip(self.model.adapted_linears(), model.adapted_linears()):
            shadow.weight = nn.Parameter(base.weight(linear), requires_grad=False)
            if linear.bias is not None:
                shadow.bias = nn.Parameter(base.bias(linear), requires_grad=False)

    @torch.inference_mode()
    def logits(self, prompts: list[list[int]], delta: Delta | None = None) -> torch.Tensor:
        """Logits [Σ len(prompt), vocab] at every position of every prompt, all prompts in one forward."""
        cfg = self.model.config
        device, dtype = self.model.embed_tokens.weight.device, self.model.embed_tokens.weight.dtype
        ctx = ForwardContext.prefills_only(
            [torch.tensor(p) for p in prompts], None if delta is None else _MergedLayers(delta), device=device
        )
        rows = (len(ctx.input_ids), cfg.num_kv_heads, cfg.head_dim)  # a scratch cache: one row per token
        keys = [torch.zeros(rows, dtype=dtype, device=device) for _ in range(cfg.num_layers)]
        values = [torch.zeros_like(k) for k in keys]
        return self.model(ctx, keys, values).cpu()


def compare(reference: ReferenceModel, prompts: list[list[int]], source: Delta, converted: Delta) -> dict:
    """How far the converted adapter's logits are from the source's on `prompts` (and, for scale, how
    far the source's are from the base model's)."""
    base = reference.logits(prompts)
    a = reference.logits(prompts, source)
    b = reference.logits(prompts, converted)
    return {
        "prompts": len(prompts),
        "positions": int(a.shape[0]),
        "max_logit_diff": float((a - b).abs().max()),
        "source_max_logit_change": float((a - base).abs().max()),
        "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).double().mean()),
    }
