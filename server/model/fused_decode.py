"""The decode step as a few large ops: consecutive decoder layers per compiled call (`torch.compile`).

A decode-only step (every sequence adds one token) is where a server spends its time, and in eager mode
much of it is not the weight matmuls: ~40 small ops per layer (norms, RoPE, the gather of each
sequence's KV through its block table, softmax, activations, adapter groups), each a dispatch and a
pass over memory. Here one function holds a layer's decode; inductor turns everything between the four
weight matmuls into a handful of generated C++ loops (RMSNorm with its residual add, RoPE with the
cos/sin gather and the KV write, attention over the paged cache with the block-table gather fused into
its reductions, SiLU·up), and the matmuls stay the BLAS calls eager mode makes.

Layers per call (`LAYERS_PER_CALL`): a compiled call costs ~200 us of guards and wrappers, so one call
per layer spends ~6 ms of a 30-layer step there, while a whole-model graph takes minutes to compile on
2 cores (measured, SmolLM2 bf16, one thread: 1 layer/call compiles in 20 s and runs a 16-sequence step
at 1.5x the bare matmuls, 6 layers/call in 47 s at 1.35x, 30 in 212 s at ~1.3x). Every chunk has the
same shapes, so one compilation serves them all. Shapes: the batch size B, the context length L and
the adapter rank bucket R are dynamic, so steps never recompile as sequences grow or come and go
(B = 1 is padded to 2 by repeating row 0, which writes the same K/V to the same row, since torch
specialises size-1 dimensions). Two variants are compiled at startup: base only, and LoRA family in
token form (`kernels.lora_tokens`: one slot index per token and layer, so any mix of up to S adapters
is the same graph). Steps with a prefill, with VeRA/RandLoRA tokens, or on the Triton adapter backend
run eagerly.

The eager model (`LlamaModel.forward`) stays the reference: it is what `--no-compile` runs and what
the exactness tests compare with PEFT. This path differs from it by rounding only (attention and
norms reduce in inductor's order, in fp32 for every dtype; the adapter scale is folded per column);
tests/test_compile_decode.py bounds the difference and checks greedy tokens are identical.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.batch import LoraRows
from kernels.lora_tokens import TokenLoraStack, lora_tokens
from server.model.context import ForwardContext
from server.model.hf_config import ModelConfig
from server.model.llama import LlamaModel

log = logging.getLogger(__name__)

LAYERS_PER_CALL = 6  # at most; the largest divisor of the layer count up to this (see the module doc)

LayerWeights = tuple[torch.Tensor | None, ...]
LinearLora = tuple[torch.Tensor, ...]  # idx, A, Bt, col_scale, g, bias (kernels.lora_tokens)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora: LinearLora | None,
    slice_sizes: list[int],
) -> torch.Tensor:
    y = F.linear(x, weight, bias)
    return y if lora is None else lora_tokens(x, y, *lora, slice_sizes, base_bias=bias)


def make_decode_layers(config: ModelConfig) -> Callable[..., torch.Tensor]:
    """The decode step of consecutive decoder layers as a pure function of tensors (the model's sizes
    are constants of the closure, so the compiled code is specialised to them)."""
    heads, kv_heads, head_dim = config.num_heads, config.num_kv_heads, config.head_dim
    group = heads // kv_heads
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    eps, scale, inter, hidden = config.rms_norm_eps, head_dim**-0.5, config.intermediate_size, config.hidden_size

    def decode_layer(
        x: torch.Tensor,  # [B, hidden]
        cos: torch.Tensor,  # [B, 1, D]
        sin: torch.Tensor,
        write_rows: torch.Tensor,  # [B] cache row of each new token
        read_rows: torch.Tensor,  # [B, L] cache rows of each sequence's positions (null block past its end)
        visible: torch.Tensor,  # [B, L] bool
        k_cache: torch.Tensor,  # [rows, KVH, D]
        v_cache: torch.Tensor,
        w: LayerWeights,
        lora: tuple[LinearLora, ...] | None,
    ) -> torch.Tensor:
        in_norm, qkv_w, qkv_b, o_w, o_b, post_norm, gu_w, gu_b, down_w, down_b = w
        lq, lo, lgu, ld = lora if lora is not None else (None,) * 4
        batch, length = read_rows.shape
        qkv = _linear(_rms(x, in_norm, eps), qkv_w, qkv_b, lq, [q_size, kv_size, kv_size])
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = _rope(q.view(batch, heads, head_dim), cos, sin)
        k = _rope(k.view(batch, kv_heads, head_dim), cos, sin)
        k_cache.index_copy_(0, write_rows, k)
        v_cache.index_copy_(0, write_rows, v.view(batch, kv_heads, head_dim))
        flat = read_rows.flatten()
        keys = k_cache.index_select(0, flat).view(batch, length, kv_heads, 1, head_dim).float()
        values = v_cache.index_select(0, flat).view(batch, length, kv_heads, 1, head_dim).float()
        # Products and sums, not matmuls: inductor fuses the block-table gather into these reductions.
        scores = (q.view(batch, 1, kv_heads, group, head_dim).float() * keys).sum(-1) * scale  # [B, L, KVH, G]
        scores = scores.masked_fill(~visible[:, :, None, None], float("-inf"))
        probs = torch.softmax(scores, dim=1)
        out = (probs[..., None] * values).sum(1).to(x.dtype)  # [B, KVH, G, D]
        x = x + _linear(out.reshape(batch, q_size), o_w, o_b, lo, [hidden])
        gate, up = _linear(_rms(x, post_norm, eps), gu_w, gu_b, lgu, [inter, inter]).split(inter, dim=-1)
        return x + _linear(F.silu(gate) * up, down_w, down_b, ld, [hidden])

    def decode_layers(
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        write_rows: torch.Tensor,
        read_rows: torch.Tensor,
        visible: torch.Tensor,
        k_caches: tuple[torch.Tensor, ...],
        v_caches: tuple[torch.Tensor, ...],
        ws: tuple[LayerWeights, ...],
        loras: tuple[tuple[LinearLora, ...], ...] | None,
    ) -> torch.Tensor:
        """Consecutive layers in one call (one compiled graph, unrolled)."""
        for i, (k_cache, v_cache, w) in enumerate(zip(k_caches, v_caches, ws)):
            lora = None if loras is None else loras[i]
            x = decode_layer(x, cos, sin, write_rows, read_rows, visible, k_cache, v_cache, w, lora)
        return x

    return decode_layers


def _layer_weights(layer) -> LayerWeights:
    a, m = layer.self_attn, layer.mlp
    return (
        layer.input_layernorm.weight,
        a.qkv_proj.weight,
        a.qkv_proj.bias,
        a.o_proj.weight,
        a.o_proj.bias,
        layer.post_attention_layernorm.weight,
        m.gate_up_proj.weight,
        m.gate_up_proj.bias,
        m.down_proj.weight,
        m.down_proj.bias,
    )


@dataclass(slots=True)
class CompileReport:
    seconds: float  # wall time of the warm-up that compiled the variants
    variants: list[str]


class FusedDecoder:
    """Runs decode-only steps through the compiled layers function (or, with `compile=False`, the same
    function eagerly: a test oracle for the compiled code, not a fast path).

    `lora`: the stacked token-form mirror of the LoRA-family slots (None: LoRA steps run eagerly).
    """

    def __init__(
        self,
        model: LlamaModel,
        k_caches: list[torch.Tensor],
        v_caches: list[torch.Tensor],
        lora: TokenLoraStack | None = None,
        compile: bool = True,
        layers_per_call: int = LAYERS_PER_CALL,
    ) -> None:
        self.model = model
        self.k_caches = k_caches
        self.v_caches = v_caches
        self.lora = lora
        self.layer_keys = [
            (
                layer.self_attn.qkv_proj.key,
                layer.self_attn.o_proj.key,
                layer.mlp.gate_up_proj.key,
                layer.mlp.down_proj.key,
            )
            for layer in model.layers
        ]
        fn = make_decode_layers(model.config)
        self.layer_fn = torch.compile(fn, dynamic=False, fullgraph=True) if compile else fn
        layers = len(model.layers)
        # Equal chunks, so one compiled graph serves every call.
        self.layers_per_call = max(n for n in range(1, min(layers_per_call, layers) + 1) if layers % n == 0)
        self.compiled = compile
        self.report: CompileReport | None = None
        self.steps = 0
        self.disabled = False  # set when a compiled step failed: the engine is eager from then on
        self._variant: tuple[bool, bool, bool, bool] = (True, True, True, True)
        self._variant_version = -1

    def supports(self, ctx: ForwardContext) -> bool:
        """Decode-only steps whose adapters (if any) are all LoRA family, with a token-form mirror."""
        if self.disabled or ctx.prefills or not ctx.num_decode:
            return False
        return ctx.adapters is None or (self.lora is not None and type(ctx.adapters) is LoraRows)

    @torch.inference_mode()
    def __call__(self, ctx: ForwardContext) -> torch.Tensor | None:
        """Next-token logits [len(ctx.logits_rows), vocab] float32 of a decode-only step (`supports(ctx)`),
        in the sampler's row order; None if the compiled code refused the step (the caller runs it eagerly,
        which rewrites every KV row this attempt may have written)."""
        batch = ctx.num_decode
        token_slots = None
        if ctx.adapters is not None:
            plan: LoraRows = ctx.adapters
            self.lora.sync(plan.slot_factors)
            slots = [self.lora.empty_slot] * batch
            for g in plan.groups:
                slots[g.start : g.end] = [g.slot] * (g.end - g.start)
            token_slots = torch.tensor(slots, device=ctx.input_ids.device)
        try:
            # Everything was compiled at warm-up: a recompile here would stall the server for seconds, so
            # a step that would need one fails instead, and the engine goes on eagerly.
            with torch.compiler.set_stance("fail_on_recompile" if self.report is not None else "default"):
                hidden = self._forward(
                    ctx.input_ids,
                    ctx.positions,
                    ctx.write_rows,
                    ctx.decode_rows,
                    ctx.decode_mask[:, 0, 0, :],
                    token_slots,
                )
        except Exception:
            log.exception("the compiled decode step failed; the engine runs eagerly from now on")
            self.disabled = True
            return None
        self.steps += 1
        model = self.model
        head = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
        return F.linear(model.norm(hidden[ctx.logits_rows]), head).float()

    def _lora_linears(self) -> tuple[bool, bool, bool, bool]:
        """Which of each layer's four linears (q/k/v, o, gate/up, down) get the token-form LoRA: all four
        when a loaded adapter targets the MLP, else the attention's two (the common q,k,v,o adapters),
        so those steps skip the zero slots of the MLP's wide layers. Two graphs, both compiled at
        warm-up: never a compile while serving."""
        if self._variant_version != self.lora.version:
            mlp = any(self.lora.adapted(key) for keys in self.layer_keys for key in keys[2:])
            self._variant = (True, True, mlp, mlp)
            self._variant_version = self.lora.version
        return self._variant

    def _forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        write_rows: torch.Tensor,
        read_rows: torch.Tensor,
        visible: torch.Tensor,
        token_slots: torch.Tensor | None,
        mark_dynamic: bool = False,
        lora_linears: tuple[bool, bool, bool, bool] | None = None,
    ) -> torch.Tensor:
        """Hidden states [B (padded to >= 2), hidden] after the last layer. `lora_linears`: which of
        each layer's linears take the LoRA (default: `_lora_linears()`)."""
        if input_ids.shape[0] == 1:  # size-1 dims are specialised by torch: repeat the row instead
            pad = lambda t: None if t is None else t.expand(2, *t.shape[1:]).contiguous()  # noqa: E731
            input_ids, positions, write_rows, read_rows, visible, token_slots = map(
                pad, (input_ids, positions, write_rows, read_rows, visible, token_slots)
            )
        # Compiled code is specialised to strides and dispatch keys: the step's index tensors become fresh
        # contiguous (inference) tensors here, as in the warm-up, whatever views the runner handed over.
        write_rows, read_rows, visible = (
            t.clone(memory_format=torch.contiguous_format) for t in (write_rows, read_rows, visible)
        )
        model = self.model
        cos = model.rope_cos[positions].unsqueeze(1)
        sin = model.rope_sin[positions].unsqueeze(1)
        x = model.embed_tokens(input_ids)
        # Per layer: the slot each token reads (the empty slot where its adapter skips the layer).
        lora_index = [] if token_slots is None else list(self.lora.token_index(token_slots).unbind(0))
        if mark_dynamic:  # the tensors the layer function sees: B on all, L on the KV reads, R on the stacks
            for t in (x, cos, sin, write_rows, read_rows, visible, *lora_index):
                torch._dynamo.mark_dynamic(t, 0)
            for t in (read_rows, visible):
                torch._dynamo.mark_dynamic(t, 1)
            for layer in self.lora.layers.values() if self.lora is not None else ():
                torch._dynamo.mark_dynamic(layer.A, 2)
                torch._dynamo.mark_dynamic(layer.Bt, 1)
        per_call = self.layers_per_call
        for first in range(0, len(model.layers), per_call):
            chunk = range(first, first + per_call)
            loras = None
            if lora_index:
                stack, used = self.lora, lora_linears or self._lora_linears()
                loras = tuple(
                    tuple(
                        (lora_index[stack.index_of[key]], *stack.layers[key].tensors()) if on else None
                        for key, on in zip(self.layer_keys[i], used)
                    )
                    for i in chunk
                )
            x = self.layer_fn(
                x,
                cos,
                sin,
                write_rows,
                read_rows,
                visible,
                tuple(self.k_caches[i] for i in chunk),
                tuple(self.v_caches[i] for i in chunk),
                tuple(_layer_weights(model.layers[i]) for i in chunk),
                loras,
            )
        return x

    # ---- warm-up ------------------------------------------------------------------------------
    def warm_up(self, null_rows: torch.Tensor) -> CompileReport:
        """Compile every variant now (startup), on a synthetic batch that reads and writes only the
        cache rows `null_rows` (the caller zeroes them afterwards). Marks the dims that vary."""
        started = time.perf_counter()
        device = self.model.embed_tokens.weight.device
        batch, length = 5, 19  # distinct from each other and from R, so torch keeps separate symbols
        rows = null_rows[:batch]
        args = dict(
            input_ids=torch.arange(batch, device=device),
            positions=torch.arange(batch, device=device),
            write_rows=rows.clone(),
            read_rows=null_rows[torch.arange(length) % len(null_rows)].repeat(batch, 1),
            visible=torch.ones(batch, length, dtype=torch.bool, device=device),
        )
        variants = ["base"]
        with torch.inference_mode():
            self._forward(**args, token_slots=None, mark_dynamic=True)
            if self.lora is not None:
                slots = torch.full((batch,), self.lora.empty_slot, device=device)
                for name, linears in (("lora q,k,v,o", (True, True, False, False)), ("lora all", (True,) * 4)):
                    self._forward(**args, token_slots=slots, mark_dynamic=True, lora_linears=linears)
                    variants.append(name)
        self.report = CompileReport(time.perf_counter() - started, variants)
        return self.report
