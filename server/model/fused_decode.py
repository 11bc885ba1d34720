"""The decode step as a few large ops: one compiled function per decoder layer (`torch.compile`).

A decode-only step (every sequence adds one token) is where a server spends its time, and in eager mode
most of it is not the weight matmuls: ~40 small ops per layer (norms, RoPE, the gather of each
sequence's KV through its block table, softmax, activations, adapter groups), each a dispatch and a
pass over memory. Here one function holds a whole layer's decode; inductor turns everything between
the four weight matmuls into a handful of generated C++ loops (RMSNorm with its residual add, RoPE
with the cos/sin gather and the KV write, attention over the paged cache with the block-table gather
fused into its reductions, SiLU·up), and the matmuls stay the BLAS calls eager mode makes.

Why per layer and not the whole model: every layer has the same shapes, so one compilation serves all
of them (~10-20 s on a 2-core machine against minutes for a 30-layer graph), and a call costs ~30-60
us of guards and wrappers, ~1-2 ms a step. Shapes: the batch size B, the context length L and the
adapter rank bucket R are dynamic, so steps never recompile as sequences grow or come and go (B = 1 is
padded to 2 by repeating row 0, which writes the same K/V to the same row, since torch specialises
size-1 dimensions). Two variants are compiled at startup: base only, and LoRA family in token form
(`kernels.lora_tokens`: one slot index per token and layer, so any mix of up to S adapters is the same
graph). Steps with a prefill, with VeRA/RandLoRA tokens, or on the Triton adapter backend run eagerly.

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

LayerWeights = tuple[torch.Tensor | None, ...]
LinearLora = tuple[torch.Tensor, ...]  # idx, A, B, col_scale, g, bias, col_slice


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora: LinearLora | None) -> torch.Tensor:
    y = F.linear(x, weight, bias)
    return y if lora is None else lora_tokens(x, y, *lora, base_bias=bias)


def make_decode_layer(config: ModelConfig) -> Callable[..., torch.Tensor]:
    """The decode step of one decoder layer as a pure function of tensors (the model's sizes are
    constants of the closure, so the compiled code is specialised to them)."""
    heads, kv_heads, head_dim = config.num_heads, config.num_kv_heads, config.head_dim
    group = heads // kv_heads
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    eps, scale, inter = config.rms_norm_eps, head_dim**-0.5, config.intermediate_size

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
        qkv = _linear(_rms(x, in_norm, eps), qkv_w, qkv_b, lq)
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
        x = x + _linear(out.reshape(batch, q_size), o_w, o_b, lo)
        gate, up = _linear(_rms(x, post_norm, eps), gu_w, gu_b, lgu).split(inter, dim=-1)
        return x + _linear(F.silu(gate) * up, down_w, down_b, ld)

    return decode_layer


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
    """Runs decode-only steps through the compiled layer function (or, with `compile=False`, the same
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
        fn = make_decode_layer(model.config)
        self.layer_fn = torch.compile(fn, dynamic=False, fullgraph=True) if compile else fn
        self.compiled = compile
        self.report: CompileReport | None = None
        self.steps = 0
        self.disabled = False  # set when a compiled step failed: the engine is eager from then on

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

    def _forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        write_rows: torch.Tensor,
        read_rows: torch.Tensor,
        visible: torch.Tensor,
        token_slots: torch.Tensor | None,
        mark_dynamic: bool = False,
    ) -> torch.Tensor:
        """Hidden states [B (padded to >= 2), hidden] after the last layer."""
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
                torch._dynamo.mark_dynamic(layer.B, 2)
        for i, (layer, k_cache, v_cache) in enumerate(zip(model.layers, self.k_caches, self.v_caches)):
            lora = None
            if lora_index:
                stack = self.lora
                lora = tuple(
                    (lora_index[stack.index_of[key]], *stack.layers[key].tensors()) for key in self.layer_keys[i]
                )
            x = self.layer_fn(
                x, cos, sin, write_rows, read_rows, visible, k_cache, v_cache, _layer_weights(layer), lora
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
                self._forward(**args, token_slots=slots, mark_dynamic=True)
                variants.append("lora")
        self.report = CompileReport(time.perf_counter() - started, variants)
        return self.report
